"""``toolkit gen-repo``: the specs -> a validated Triton model repository (``toolkit.repository``)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("gen-repo")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Folder of model folders, each with a model.yaml.")
@click.option("--ensembles", "ensembles_dir", type=click.Path(path_type=Path), default=Path("ensembles"),
              show_default=True, help="Folder of ensemble specs (*.yaml).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("build/model_repository"),
              show_default=True, help="Where to write the Triton model repository (replaced whole).")
@click.option("--target", type=click.Choice(["embedded", "container"]), default="embedded",
              show_default=True,
              help="embedded: the python-only tritonserver of nvidia-pytriton (ONNX runs via onnxruntime "
                   "in a python model); container: tritonserver 24.10 with its onnxruntime backend.")
@click.option("--check", is_flag=True, help="Validate the specs and configs without writing anything.")
def gen_repo(models_dir: Path, ensembles_dir: Path, out: Path, target: str, check: bool) -> None:
    """Generate a validated Triton model repository from the specs."""
    from toolkit.repository import check_repository, generate_repository, load_project

    project = load_project(models_dir, ensembles_dir)
    for note in project.notes:
        click.echo(f"Note: {note}", err=True)
    if check:
        check_repository(project, target=target, models_label=models_dir.name)  # type: ignore[arg-type]
        click.echo(f"OK: {len(project.models)} model(s), {len(project.ensembles)} ensemble(s) valid "
                   f"for target {target}")
        return
    report = generate_repository(project, out, target=target, models_label=models_dir.name)  # type: ignore[arg-type]
    for name, kind in sorted(report.models.items()):
        click.echo(f"  {name:<24} {kind}")
    click.echo(f"Wrote {report.path} ({len(report.models)} models, {report.files} files, target {target})")
