"""``toolkit package``: a production image and Kubernetes manifests, written next to each other.

    <out>/triton/Dockerfile            FROM nvcr.io/nvidia/tritonserver:24.10-py3, the hooks' runtime only
    <out>/triton/model_repository/     gen-repo --target container (ONNX on Triton's onnxruntime backend)
    <out>/triton/runtime/toolkit/      toolkit.runtime.STUB_SIDE (hooks.py, runtime/, builtins/): what the stubs import
    <out>/gateway/Dockerfile           the REST gateway (build it from the project root)
    <out>/kubernetes/triton.yaml       Deployment, headless + HTTP Services, PDB, HPA, adapter rule, Secret
                                       (--gpu: nvidia.com/gpu, a GPU node selector and toleration)
    <out>/kubernetes/gateway.yaml      the gateway's Deployment, Service, ConfigMap, Secret

Checked here, offline: the repository against Triton's ModelConfig protobuf (gen-repo), the
Dockerfiles with hadolint, the manifests against the Kubernetes schemas (kubernetes-validate) and
with checkov. Not checked here: building or running the images (no Docker engine), or applying the
manifests to a cluster. Everything is written aside and swapped in whole, so a failure leaves
nothing half-written.

Imports: ``toolkit.repository`` (gen-repo), ``toolkit.runtime.STUB_SIDE`` (what the image's stubs
import), ``toolkit.errors`` and ``toolkit.files``; only the CLI imports deploy.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from toolkit.deploy.kubernetes import GpuRequest
from toolkit.errors import ToolkitError
from toolkit.files import replace_dir, staging_dir
from toolkit.runtime import STUB_SIDE

MARKER = ".toolkit-package"
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,40}[a-z0-9])?$")
#: Versions the hooks' runtime installs in the 24.10 image (its python is 3.10).
RUNTIME_PINS = ("numpy==1.26.4", "tokenizers==0.20.3", "pillow==10.4.0")


class PackageError(ToolkitError):
    """The image or the manifests could not be written."""


@dataclass
class PackageReport:
    path: Path
    files: list[str]


def package(models_dir: Path, ensembles_dir: Path, out: Path, *, name: str = "toolkit", replicas: int = 2,
            image: str = "registry.example.com/toolkit-triton:1", gateway_image: str | None = None,
            gateway_settings: Path | None = None, gpu: GpuRequest | None = None) -> PackageReport:
    """``gpu``: Triton's pods ask for GPUs (``toolkit.deploy.kubernetes.GpuRequest``); the official
    image has the CUDA runtime and onnxruntime's GPU backend already."""
    from toolkit.deploy.dockerfile import gateway_dockerfile, triton_dockerfile
    from toolkit.deploy.kubernetes import gateway_manifests, triton_manifests
    from toolkit.repository.generate import generate_repository
    from toolkit.repository.project import load_project

    if replicas < 1:
        raise PackageError(f"--replicas must be at least 1, got {replicas}")
    if not _NAME.match(name):
        raise PackageError(f"--name {name!r}: use lower-case letters, digits and '-' (a Kubernetes name)")
    out = Path(out).absolute()
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise PackageError(f"{out} is not empty and was not written by `toolkit package`; choose another --out")
    project = load_project(models_dir, ensembles_dir)   # a spec that does not validate stops here
    _check_gpu_request(project, gpu)
    staging = staging_dir(out)
    try:
        generate_repository(project, staging / "triton" / "model_repository", target="container",
                            models_label=models_dir.name)
        runtime = staging / "triton" / "runtime" / "toolkit"
        source = Path(__file__).resolve().parent.parent
        runtime.mkdir(parents=True)
        (runtime / "__init__.py").write_text("")
        for entry in STUB_SIDE:  # what the python stubs import, and nothing else of the toolkit
            if (source / entry).is_dir():
                shutil.copytree(source / entry, runtime / entry,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "ruff.toml", ".ruff_cache"))
            else:
                shutil.copyfile(source / entry, runtime / entry)
        (staging / "triton" / "Dockerfile").write_text(triton_dockerfile(RUNTIME_PINS))
        (staging / "gateway").mkdir()
        (staging / "gateway" / "Dockerfile").write_text(gateway_dockerfile())
        settings_text = _gateway_settings(gateway_settings)
        kube = staging / "kubernetes"
        kube.mkdir()
        _dump(kube / "triton.yaml", triton_manifests(name, image, replicas, f"{name}-admin", gpu))
        _dump(kube / "gateway.yaml", gateway_manifests(name, gateway_image or image.replace("triton", "gateway"),
                                                         name, settings_text))
        (staging / MARKER).write_text("written by `toolkit package`\n")
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PackageReport(out, files)


def _check_gpu_request(project, gpu: GpuRequest | None) -> None:
    """The pods' GPUs against the models' instance groups: Triton cannot load a GPU instance group in
    a pod without a GPU, nor on a device id the pod does not have; a GPU no model asks for is waste."""
    wanting = {name: m.spec for name, m in sorted(project.models.items()) if m.spec.on_gpu}
    if gpu is None:
        if wanting:
            raise PackageError(f"{', '.join(wanting)}: instance_group kind gpu, but the pods get no GPU: pass --gpu")
        return
    if gpu.count < 1:
        raise PackageError(f"--gpus-per-pod must be at least 1, got {gpu.count}")
    if not wanting:
        raise PackageError("--gpu asks every Triton pod for a GPU, but no model has an instance_group of kind gpu: "
                           "set one in a model.yaml, or drop --gpu")
    for name, spec in wanting.items():
        beyond = sorted({d for g in spec.groups if g.kind == "gpu" for d in g.gpus or []} - set(range(gpu.count)))
        if beyond:
            raise PackageError(f"model '{name}' asks for GPU {', '.join(map(str, beyond))}, but each pod gets "
                               f"{gpu.count} (ids 0..{gpu.count - 1}): raise --gpus-per-pod or fix its gpus")


def _dump(path: Path, documents: list[dict]) -> None:
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")


def _gateway_settings(path: Path | None) -> str:
    """The gateway's settings for the ConfigMap, its secrets replaced by ${...} references that the
    gateway fills from its environment (the Secret): the demo secrets never leave the machine."""
    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if path else {"API": {"AppIdSecret": {"APP": "x"}}}
    api = dict(raw.get("API") or {})
    api["AppIdSecret"] = {app: "${TOOLKIT_APP_SECRET}" for app in (api.get("AppIdSecret") or {"APP": ""})}
    if "SM2PrivateKey" in api:
        api["SM2PrivateKey"] = "${TOOLKIT_SM2_PRIVATE_KEY}"
    api["Addr"] = "0.0.0.0"
    return yaml.safe_dump({**raw, "API": api}, sort_keys=False)
