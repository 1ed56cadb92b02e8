"""`toolkit package`: the Dockerfiles pass hadolint, the manifests pass the Kubernetes schemas
(strict) and checkov with no failed check that is not justified, and the important fields hold.
Offline only: no image is built and no cluster is touched (see the README)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from google.protobuf import text_format
from onnx_models import write_linear_onnx
from serving import PROJECT, ROOT
from tritonclient.grpc import model_config_pb2

from toolkit.cli.main import cli
from toolkit.deploy import MARKER, PackageError, package
from toolkit.deploy.kubernetes import GpuRequest

K8S_VERSION = "1.31.0"
BIN = Path(sys.executable).parent


GPU_LINEAR = """
instance_group: {kind: gpu, gpus: [0, 1], count: 2}
optimization:
  gpu_execution_accelerator: {name: tensorrt, precision_mode: FP16, max_workspace_size_bytes: 1073741824}
  input_pinned_memory: true
"""


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def packaged(request, tmp_path_factory) -> Path:
    """The test project packaged as it is (cpu) and with its ONNX model on two GPUs (gpu, --gpu)."""
    root = tmp_path_factory.mktemp(f"package-{request.param}")
    shutil.copytree(PROJECT, root / "project")
    linear = root / "project" / "models" / "linear"
    write_linear_onnx(linear / "1" / "model.onnx")
    gpu = None
    if request.param == "gpu":
        (linear / "model.yaml").write_text((linear / "model.yaml").read_text() + GPU_LINEAR)
        gpu = GpuRequest(count=2, node_selector={"cloud.example.com/accelerator": "l4"})
    report = package(root / "project" / "models", root / "project" / "ensembles", root / "deploy",
                     name="demo", replicas=3, image="registry.example.com/demo-triton:1",
                     gateway_settings=ROOT / "gateway.yaml", gpu=gpu)
    return report.path


def documents(path: Path) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(path.read_text())}


def test_dockerfiles_pass_hadolint(packaged):
    for dockerfile in (packaged / "triton" / "Dockerfile", packaged / "gateway" / "Dockerfile"):
        done = subprocess.run([str(BIN / "hadolint"), str(dockerfile)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_triton_image_installs_only_the_hooks_runtime_runs_unprivileged_and_takes_the_admin_key_from_a_secret(
        packaged):
    text = (packaged / "triton" / "Dockerfile").read_text()
    assert text.startswith("# Generated") and "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in text
    assert "numpy==1.26.4" in text and "tensorflow==" not in text.lower() and "pip install --no-cache-dir numpy" in text
    assert "USER 1000:1000" in text and "--model-control-mode=explicit" in text
    assert "${TOOLKIT_RESTRICT_APIS" in text and "REPLACE-ME" not in text
    runtime = packaged / "triton" / "runtime" / "toolkit"
    assert (runtime / "hooks.py").is_file() and (runtime / "runtime" / "adapter.py").is_file()
    assert (runtime / "builtins" / "text.py").is_file() and not (runtime / "cli").exists()
    assert not (runtime / "runtime" / "ruff.toml").exists()
    config = (packaged / "triton" / "model_repository" / "linear" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config   # the container target


def test_manifests_pass_the_kubernetes_schemas_strictly(packaged):
    files = sorted(str(p) for p in (packaged / "kubernetes").glob("*.yaml"))
    done = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "-k", K8S_VERSION, *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == sum(1 for f in files for _ in yaml.safe_load_all(Path(f).read_text()))


def test_checkov_finds_no_failed_check_and_every_skip_is_justified(packaged):
    checkov = os.environ.get("TOOLKIT_CHECKOV") or str(ROOT / ".venv-lint" / "bin" / "checkov")
    assert Path(checkov).is_file(), f"{checkov} missing: ./dev.sh test installs checkov into .venv-lint"
    done = subprocess.run([checkov, "-d", str(packaged), "--framework", "kubernetes", "dockerfile", "--compact",
                           "--output", "json"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"})
    import json

    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [c for r in reports for c in r["results"].get("failed_checks", [])]
    skipped = [c for r in reports for c in r["results"].get("skipped_checks", [])]
    assert sum(r["summary"]["passed"] for r in reports) > 100, done.stderr[-2000:]   # it really checked them
    assert {r["check_type"] for r in reports} == {"kubernetes", "dockerfile"}
    assert failed == [], [(c["check_id"], c["resource"]) for c in failed]
    reasons = [c.get("suppress_comment") or c["check_result"].get("suppress_comment", "") for c in skipped]
    assert skipped and all(len(r) > 20 for r in reasons), reasons          # each skip says why


def test_the_important_fields_hold(packaged):
    triton = documents(packaged / "kubernetes" / "triton.yaml")
    pod = triton["Deployment/demo"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert triton["Deployment/demo"]["spec"]["replicas"] == 3
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 120
    assert container["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert triton["Service/demo-grpc"]["spec"]["clusterIP"] == "None"            # headless: gRPC balances
    assert triton["PodDisruptionBudget/demo"]["spec"]["maxUnavailable"] == 1
    hpa = triton["HorizontalPodAutoscaler/demo"]["spec"]["metrics"]
    assert hpa[0]["pods"]["metric"]["name"] == "triton_queue_duration_us_per_request"
    assert hpa[1]["resource"]["name"] == "cpu"
    assert "nv_inference_queue_duration_us" in triton["ConfigMap/demo-adapter-rules"]["data"]["config.yaml"]
    gateway = documents(packaged / "kubernetes" / "gateway.yaml")
    settings = gateway["ConfigMap/demo-gateway-settings"]["data"]["gateway.yaml"]
    demo = yaml.safe_load((ROOT / "gateway.yaml").read_text())["API"]
    assert next(iter(demo["AppIdSecret"].values())) not in settings and demo["SM2PrivateKey"] not in settings
    assert "${TOOLKIT_APP_SECRET}" in settings
    args = gateway["Deployment/demo-gateway"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "dns:///demo-grpc:8001" in args


def test_gateway_reads_its_secrets_from_the_environment(tmp_path, monkeypatch, packaged):
    from toolkit.errors import GatewayError
    from toolkit.gateway.settings import load_settings

    settings = documents(packaged / "kubernetes" / "gateway.yaml")["ConfigMap/demo-gateway-settings"]
    path = tmp_path / "gateway.yaml"
    path.write_text(settings["data"]["gateway.yaml"])
    with pytest.raises(GatewayError, match=r"\$\{TOOLKIT_APP_SECRET\} is not set"):
        load_settings(path)
    monkeypatch.setenv("TOOLKIT_APP_SECRET", "s3cret")
    monkeypatch.setenv("TOOLKIT_SM2_PRIVATE_KEY", yaml.safe_load((ROOT / "gateway.yaml").read_text())["API"]
                       ["SM2PrivateKey"])
    loaded = load_settings(path)
    assert {v.get_secret_value() for v in loaded.api.app_id_secret.values()} == {"s3cret"}


def test_bad_input_is_one_error_and_nothing_half_written(tmp_path):
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "model.yaml").write_text("kind: python\nhook: nope\n")
    out = tmp_path / "deploy"
    result = CliRunner().invoke(cli, ["package", "--models", str(tmp_path / "models"), "--ensembles",
                                      str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".deploy")]
    with pytest.raises(PackageError, match="--replicas must be at least 1"):
        package(tmp_path / "models", tmp_path / "none", out, replicas=0)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(PackageError, match="was not written by `toolkit package`"):
        package(tmp_path / "models", tmp_path / "none", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me" and not (foreign / MARKER).exists()


def test_gpu_pods_request_nvidia_gpus_on_gpu_nodes_and_the_config_asks_for_them(packaged):
    pod = documents(packaged / "kubernetes" / "triton.yaml")["Deployment/demo"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    config = parsed_config(packaged / "triton" / "model_repository" / "linear" / "config.pbtxt")
    if "gpu" not in packaged.parent.name:
        assert "nvidia.com/gpu" not in resources["limits"] and "nodeSelector" not in pod and "tolerations" not in pod
        assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        return
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "2"
    assert pod["nodeSelector"] == {"cloud.example.com/accelerator": "l4"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2, [0, 1])
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
    assert "FROM nvcr.io/nvidia/tritonserver:24.10-py3" in (packaged / "triton" / "Dockerfile").read_text()


def parsed_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_gpu_requests_that_do_not_fit_the_models_are_one_error(tmp_path):
    root = tmp_path / "project"
    shutil.copytree(PROJECT, root)
    linear = root / "models" / "linear"
    write_linear_onnx(linear / "1" / "model.onnx")
    args = (root / "models", root / "ensembles", tmp_path / "deploy")
    with pytest.raises(PackageError, match="no model has an instance_group of kind gpu"):
        package(*args, gpu=GpuRequest())
    (linear / "model.yaml").write_text((linear / "model.yaml").read_text() + GPU_LINEAR)
    with pytest.raises(PackageError, match=r"^linear: instance_group kind gpu, but the pods get no GPU: pass --gpu"):
        package(*args)
    with pytest.raises(PackageError, match=r"model 'linear' asks for GPU 1, but each pod gets 1 \(ids 0..0\)"):
        package(*args, gpu=GpuRequest(count=1))
    result = CliRunner().invoke(cli, ["package", "--models", str(root / "models"), "--ensembles",
                                      str(root / "ensembles"), "--out", str(tmp_path / "deploy"),
                                      "--gpus-per-pod", "2"])
    assert result.exit_code == 1 and result.output == "Error: --gpus-per-pod, --gpu-node-selector and " \
                                                      "--gpu-toleration need --gpu\n"
    result = CliRunner().invoke(cli, ["package", "--models", str(root / "models"), "--ensembles",
                                      str(root / "ensembles"), "--out", str(tmp_path / "deploy"), "--gpu",
                                      "--gpus-per-pod", "2", "--gpu-node-selector", "pool=gpu"])
    assert result.exit_code == 0, result.output
    pod = documents(tmp_path / "deploy" / "kubernetes" / "triton.yaml")["Deployment/toolkit"]["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"pool": "gpu"}
    assert not (tmp_path / "none").exists()
