"""Kubernetes manifests for Triton replicas and the gateway, built as data (dicts) and dumped with
PyYAML: never concatenated strings. What they encode, and why:

- a Deployment of Triton: readiness ``/v2/health/ready`` (a model that cannot serve takes the pod out
  of rotation: the stub watchdog's unload makes that true), liveness ``/v2/health/live``, a startup
  probe long enough for model loading, requests and limits, a restricted securityContext, metrics on
  8002 annotated for scraping;
- a headless Service (``clusterIP: None``) so gRPC clients resolve every pod (``dns:///``) and
  balance with ``round_robin``, plus a normal Service for HTTP;
- a PodDisruptionBudget; a HorizontalPodAutoscaler on Triton's queue time per request (a Pods
  metric served by a Prometheus Adapter rule shipped as a ConfigMap), CPU as the fallback;
- the gateway's Deployment and Service, its settings from a ConfigMap and its secrets from a Secret
  whose values are placeholders (never the demo secrets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
QUEUE_METRIC = "triton_queue_duration_us_per_request"
#: A high uid (checkov CKV_K8S_40): no clash with a host user; the images' files are world-readable.
UID = 10001
_RESTRICTED = {
    "runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


#: Checks of checkov that these manifests fail on purpose, with the reason (an annotation checkov reads).
SKIPS = {
    "CKV_K8S_43": "the image is built from the generated Dockerfile; pin its digest when you release it",
    "CKV_K8S_35": "tritonserver takes the admin header on its command line and the gateway expands ${...} "
                  "settings from its environment, so these secrets are environment variables",
}


def _meta(name: str, app: str, component: str, namespace: str = "toolkit", skips: tuple[str, ...] = (),
          **extra: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace,
                            "labels": {"app.kubernetes.io/name": app, "app.kubernetes.io/component": component},
                            **extra}
    if skips:
        meta["annotations"] = {f"checkov.io/skip{i}": f"{check}={SKIPS[check]}"
                               for i, check in enumerate(skips, start=1)}
    return meta


def _selector(app: str, component: str) -> dict[str, Any]:
    return {"matchLabels": {"app.kubernetes.io/name": app, "app.kubernetes.io/component": component}}


@dataclass(frozen=True)
class GpuRequest:
    """``toolkit package --gpu``: each Triton pod asks the NVIDIA device plugin for ``count`` GPUs
    (``nvidia.com/gpu``), lands on a node with the ``node_selector`` labels (the GPU Operator's
    feature discovery sets ``nvidia.com/gpu.present``), and tolerates the taint GPU node pools carry
    (``nvidia.com/gpu``, NoSchedule) so that only GPU work lands there."""

    count: int = 1
    node_selector: dict[str, str] = field(default_factory=lambda: {"nvidia.com/gpu.present": "true"})
    toleration_key: str = "nvidia.com/gpu"


def _gpu_pod(pod_spec: dict[str, Any], container: dict[str, Any], gpu: GpuRequest) -> None:
    for side in ("requests", "limits"):  # an extended resource: requests must equal limits
        container["resources"][side]["nvidia.com/gpu"] = str(gpu.count)
    pod_spec["nodeSelector"] = dict(gpu.node_selector)
    pod_spec["tolerations"] = [{"key": gpu.toleration_key, "operator": "Exists", "effect": "NoSchedule"}]


def triton_manifests(name: str, image: str, replicas: int, admin_secret: str,
                     gpu: GpuRequest | None = None) -> list[dict[str, Any]]:
    labels = _selector(name, "triton")["matchLabels"]
    probe = {"httpGet": {"path": "/v2/health/ready", "port": "http"}}
    container = {
        "name": "tritonserver", "image": image, "imagePullPolicy": "Always",
        "ports": [{"name": n, "containerPort": p} for n, p in TRITON_PORTS.items()],
        "env": [{"name": "TOOLKIT_RESTRICT_APIS",
                 "valueFrom": {"secretKeyRef": {"name": admin_secret, "key": "restrict-apis"}}}],
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, "periodSeconds": 10,
                          "failureThreshold": 3},
        # Loading every model (ONNX sessions, python stubs) takes tens of seconds: up to 5 min here.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},
        "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}},
        "securityContext": dict(_RESTRICTED),
        "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    pod = {
        "metadata": {"labels": dict(labels), "annotations": {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(TRITON_PORTS["metrics"]),
            "prometheus.io/path": "/metrics"}},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "terminationGracePeriodSeconds": 45,   # Triton's exit timeout (30 s) to drain, and then some
            "containers": [container],
            # The python backend's shared memory and Triton's scratch space: the root is read-only.
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
        },
    }
    if gpu is not None:
        _gpu_pod(pod["spec"], container, gpu)
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _meta(name, name, "triton", skips=("CKV_K8S_43", "CKV_K8S_35")),
         "spec": {"replicas": replicas, "selector": _selector(name, "triton"), "template": pod}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"{name}-grpc", name, "triton"),
         "spec": {"clusterIP": "None", "selector": dict(labels), "publishNotReadyAddresses": False,
                  "ports": [{"name": "grpc", "port": TRITON_PORTS["grpc"], "targetPort": "grpc"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(f"{name}-http", name, "triton"),
         "spec": {"selector": dict(labels),
                  "ports": [{"name": n, "port": p, "targetPort": n} for n, p in TRITON_PORTS.items() if n != "grpc"]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(name, name, "triton"),
         "spec": {"maxUnavailable": 1, "selector": _selector(name, "triton")}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": _meta(name, name, "triton"),
         "spec": {
             "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
             "minReplicas": replicas, "maxReplicas": max(replicas * 4, replicas + 2),
             "metrics": [
                 # Queue time per request (Prometheus Adapter rule below): scale out when requests wait.
                 {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                           "target": {"type": "AverageValue", "averageValue": "50000"}}},
                 # The fallback when no adapter runs: CPU.
                 {"type": "Resource", "resource": {"name": "cpu",
                                                   "target": {"type": "Utilization", "averageUtilization": 80}}},
             ],
             "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
         }},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{name}-adapter-rules", name, "autoscaling"),
         "data": {"config.yaml": PROMETHEUS_ADAPTER_RULE}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(admin_secret, name, "triton"), "type": "Opaque",
         "stringData": {"restrict-apis": "admin-key=REPLACE-ME"}},
        # Triton's ports only for the gateway (inference) and for anyone in the namespace on metrics.
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(name, name, "triton"),
         "spec": {"podSelector": _selector(name, "triton"), "policyTypes": ["Ingress"], "ingress": [
             {"from": [{"podSelector": _selector(name, "gateway")}],
              "ports": [{"port": TRITON_PORTS["http"]}, {"port": TRITON_PORTS["grpc"]}]},
             {"ports": [{"port": TRITON_PORTS["metrics"]}]}]}},
    ]


#: For the Prometheus Adapter (merge into its rules): queue microseconds per request, per pod.
PROMETHEUS_ADAPTER_RULE = f"""rules:
- seriesQuery: 'nv_inference_queue_duration_us{{namespace!="",pod!=""}}'
  resources: {{overrides: {{namespace: {{resource: namespace}}, pod: {{resource: pod}}}}}}
  name: {{matches: "nv_inference_queue_duration_us", as: "{QUEUE_METRIC}"}}
  metricsQuery: 'sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>)
    / clamp_min(sum(rate(nv_inference_count{{<<.LabelMatchers>>}}[1m])) by (<<.GroupBy>>), 1)'
"""


def gateway_manifests(name: str, image: str, triton_name: str, settings_yaml: str) -> list[dict[str, Any]]:
    gw = f"{name}-gateway"
    labels = _selector(name, "gateway")["matchLabels"]
    container = {
        "name": "gateway", "image": image, "imagePullPolicy": "Always",
        "args": ["gateway", "--settings", "/etc/toolkit/gateway.yaml",
                 "--triton", f"dns:///{triton_name}-grpc:{TRITON_PORTS['grpc']}", "--host", "0.0.0.0"],
        "ports": [{"name": "http", "containerPort": 5000}],
        # gateway.yaml (the ConfigMap) names its secrets as ${...}; the gateway reads them from here.
        "env": [{"name": "TOOLKIT_RESTRICT_APIS",
                 "valueFrom": {"secretKeyRef": {"name": f"{name}-admin", "key": "restrict-apis"}}},
                {"name": "TOOLKIT_APP_SECRET",
                 "valueFrom": {"secretKeyRef": {"name": f"{gw}-secrets", "key": "app-secret"}}},
                {"name": "TOOLKIT_SM2_PRIVATE_KEY",
                 "valueFrom": {"secretKeyRef": {"name": f"{gw}-secrets", "key": "sm2-private-key"}}}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 10},
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "1Gi"}},
        "securityContext": dict(_RESTRICTED),
        "volumeMounts": [{"name": "settings", "mountPath": "/etc/toolkit", "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(f"{gw}-settings", name, "gateway"),
         "data": {"gateway.yaml": settings_yaml}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(f"{gw}-secrets", name, "gateway"), "type": "Opaque",
         "stringData": {"app-secret": "REPLACE-ME", "sm2-private-key": "REPLACE-ME"}},
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _meta(gw, name, "gateway", skips=("CKV_K8S_43", "CKV_K8S_35")),
         "spec": {"replicas": 2, "selector": _selector(name, "gateway"), "template": {
             "metadata": {"labels": dict(labels)},
             "spec": {"automountServiceAccountToken": False,
                      "securityContext": {"runAsNonRoot": True, "runAsUser": UID,
                                          "seccompProfile": {"type": "RuntimeDefault"}},
                      "containers": [container],
                      "volumes": [{"name": "settings", "projected": {"sources": [
                          {"configMap": {"name": f"{gw}-settings"}}]}},
                          {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": _meta(gw, name, "gateway"),
         "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(gw, name, "gateway"),
         "spec": {"podSelector": _selector(name, "gateway"), "policyTypes": ["Ingress"],
                  "ingress": [{"ports": [{"port": 5000}]}]}},
    ]
