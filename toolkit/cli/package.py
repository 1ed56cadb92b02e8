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
def package(models_dir: Path, ensembles_dir: Path, out: Path, name: str, image: str, gateway_image: str | None,
            replicas: int, gateway_settings: Path | None) -> None:
    """Write a production image (Dockerfiles) and Kubernetes manifests for the project."""
    from toolkit.deploy import package as write_package

    report = write_package(models_dir, ensembles_dir, out, name=name, replicas=replicas, image=image,
                           gateway_image=gateway_image, gateway_settings=gateway_settings)
    click.echo(f"Wrote {report.path} ({len(report.files)} files): triton/Dockerfile, gateway/Dockerfile, "
               "kubernetes/triton.yaml, kubernetes/gateway.yaml")
    click.echo("Checked offline: configs (Triton's protobuf). Not here: building the images, applying the manifests.")
