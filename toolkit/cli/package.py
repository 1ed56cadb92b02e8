"""``toolkit package``: a production image and Kubernetes manifests (``toolkit/deploy``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Folder of model specs.")
@click.option("--ensembles", "ensembles_dir", type=click.Path(path_type=Path), default=Path("ensembles"),
              show_default=True, help="Folder of ensemble specs.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("deploy"), show_default=True,
              help="Where to write the Dockerfiles, the container repository and the manifests (replaced whole).")
@click.option("--name", default="toolkit", show_default=True, help="Kubernetes name prefix.")
@click.option("--image", default="registry.example.com/toolkit-triton:1", show_default=True,
              help="The Triton image the manifests run (build it from <out>/triton).")
@click.option("--gateway-image", default=None, help="The gateway image [default: --image with triton -> gateway].")
@click.option("--replicas", type=int, default=2, show_default=True, help="Triton pods (the HPA's minimum).")
@click.option("--gateway-settings", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="gateway.yaml to ship in the ConfigMap (its secrets become ${...} references to a Secret).")
@click.option("--gpu", is_flag=True,
              help="Triton's pods request NVIDIA GPUs (nvidia.com/gpu), with a node selector and a toleration; "
                   "needed when a model has instance_group kind gpu.")
@click.option("--gpus-per-pod", type=int, default=1, show_default=True, help="With --gpu: GPUs per Triton pod.")
@click.option("--gpu-node-selector", "gpu_node_selector", multiple=True, metavar="KEY=VALUE",
              help="With --gpu: a node label the pods need (repeatable) [default: nvidia.com/gpu.present=true].")
@click.option("--gpu-toleration", default="nvidia.com/gpu", show_default=True, metavar="KEY",
              help="With --gpu: the taint key (effect NoSchedule) the pods tolerate on GPU nodes.")
def package(models_dir: Path, ensembles_dir: Path, out: Path, name: str, image: str, gateway_image: str | None,
            replicas: int, gateway_settings: Path | None, gpu: bool, gpus_per_pod: int,
            gpu_node_selector: tuple[str, ...], gpu_toleration: str) -> None:
    """Write a production image (Dockerfiles) and Kubernetes manifests for the project."""
    from toolkit.deploy import PackageError
    from toolkit.deploy import package as write_package
    from toolkit.deploy.kubernetes import GpuRequest

    request = None
    if gpu:
        labels = {}
        for item in gpu_node_selector:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise PackageError(f"--gpu-node-selector {item!r}: expected KEY=VALUE")
            labels[key] = value
        request = GpuRequest(gpus_per_pod, labels or GpuRequest().node_selector, gpu_toleration)
    elif gpu_node_selector or gpus_per_pod != 1 or gpu_toleration != "nvidia.com/gpu":
        raise PackageError("--gpus-per-pod, --gpu-node-selector and --gpu-toleration need --gpu")
    report = write_package(models_dir, ensembles_dir, out, name=name, replicas=replicas, image=image,
                           gateway_image=gateway_image, gateway_settings=gateway_settings, gpu=request)
    click.echo(f"Wrote {report.path} ({len(report.files)} files): triton/Dockerfile, gateway/Dockerfile, "
               "kubernetes/triton.yaml, kubernetes/gateway.yaml")
    click.echo("Checked offline: configs (Triton's protobuf). Not here: building the images, applying the manifests.")
