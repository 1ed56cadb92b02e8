"""The ``toolkit`` command: option parsing and error mapping only; the work is in the library.

Every ``ToolkitError`` becomes ``Error: <message>`` and exit code 1, never a traceback. Heavy imports
(tensorflow, tritonclient) happen inside the commands that need them, so ``toolkit --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolkit.cli.bench import bench
from toolkit.cli.export import export
from toolkit.cli.gateway import gateway
from toolkit.cli.lifecycle import rollback, rollout
from toolkit.cli.package import package
from toolkit.cli.serve import serve
from toolkit.errors import ToolkitError


class ToolkitGroup(click.Group):
    """Turns the toolkit's own errors into click's ``Error: ...`` (exit 1) for every subcommand,
    including groups added from other modules."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tf-triton-toolkit")
def cli() -> None:
    """Put TensorFlow/Keras models and Python hooks into production on NVIDIA Triton."""


@cli.command("gen-repo")
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


@cli.command()
@click.argument("model")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=JSON|@FILE",
              help="An input as JSON (e.g. TEXT='[\"hello\"]'), or @FILE for raw bytes (BYTES inputs).")
@click.option("--url", default=None,
              help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc); with grpc, several "
                   "replicas as a,b,c or dns:///name:port, balanced by gRPC.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--model-version", default="", help="A specific version (default: Triton's choice).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds; also sent to Triton, which drops the request if it is still queued by then.")
@click.option("--compress", type=click.Choice(["gzip", "deflate"]), default=None,
              help="Compress the request and the answer (HTTP: gzip or deflate; gRPC: gzip).")
def infer(model: str, inputs: tuple[str, ...], url: str | None, protocol: str, model_version: str,
          timeout: float, compress: str | None) -> None:
    """Call MODEL (a model or an ensemble) and print its outputs as JSON.

    A batched model takes one item or a list of items: -i 'TEXT=["a","b"]' embeds two texts.
    """
    from toolkit.client import TritonClient, parse_input_value, to_jsonable

    url = url or ("127.0.0.1:8000" if protocol == "http" else "127.0.0.1:8001")
    files = {}
    for item in inputs:  # read @FILE inputs before connecting: a missing file is the user's mistake
        name, _, raw = item.partition("=")
        if raw.startswith("@"):
            try:
                files[item] = Path(raw[1:]).read_bytes()
            except OSError as e:
                raise ToolkitError(f"--input {name}: cannot read {raw[1:]!r}: {e.strerror or e}") from e
    with TritonClient(url, protocol=protocol, timeout=timeout, compression=compress) as client:  # type: ignore[arg-type]
        meta = {t["name"]: t for t in client.metadata(model)["inputs"]}
        arrays = {}
        for item in inputs:
            name, sep, raw = item.partition("=")
            if not sep or name not in meta:
                raise ToolkitError(f"--input {item!r}: expected NAME=VALUE with NAME one of {sorted(meta)}")
            shape = [int(d) for d in meta[name]["shape"]]
            if raw.startswith("@"):
                value = [files[item]]
            else:
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ToolkitError(f"--input {name}: not valid JSON ({e.msg}); quote strings: "
                                       f"-i '{name}=[\"hello\"]'") from e
            arrays[name] = parse_input_value(name, value, meta[name]["datatype"], shape)
        result = client.infer(model, arrays, version=model_version)
    json.dump({k: to_jsonable(v) for k, v in result.items()}, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")


cli.add_command(export)
cli.add_command(bench)
cli.add_command(gateway)
cli.add_command(serve)
cli.add_command(package)
cli.add_command(rollout)
cli.add_command(rollback)
