"""``toolkit export bert`` and ``toolkit export keras``: option parsing and one library call each.

TensorFlow and tf2onnx are imported inside the commands (by the library), never when this module
is imported. Domain errors (``ExportError``, ``WeightError``) become ``Error: ...`` and exit code 1
here, at the edge, so the group behaves the same standalone and under ``toolkit``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import click

from toolkit.errors import ExportError, ToolkitError
from toolkit.export.defaults import (
    BERT_OUT,
    BERT_REL_TOLERANCE,
    BERT_TOLERANCE,
    DEFAULT_OPSET,
    KERAS_APPLICATIONS,
    KERAS_TOLERANCE,
    REL_TOLERANCE,
)
from toolkit.export.quantize import FP16_GATE, Gate


def resolve_version(model_dir: Path | None, version: int | None, overwrite: bool) -> int:
    """``--version``, or by default the next free Triton version number in ``model_dir`` (1 for a new
    model), so a new export goes beside the versions already there (for ``toolkit rollout``); with
    ``--overwrite``, the newest existing one."""
    if version is not None:
        return version
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()] \
        if model_dir is not None and model_dir.is_dir() else []
    return max(existing, default=1) if overwrite else max(existing, default=0) + 1


def _quiet_tensorflow(quiet: bool = False) -> None:
    """TensorFlow's import takes ~10 s: say so, or the terminal looks hung. Its C++ warnings and
    errors still reach the export log (``_logged_to``); an explicit TF_CPP_MIN_LOG_LEVEL wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if not quiet:
        click.echo("loading TensorFlow (~10 s) ...", err=True)


def command_line(ctx: click.Context) -> str:
    """The export command as a user would type it again (options left at their defaults omitted):
    model.yaml's ``export:`` line."""
    words = ["toolkit", *ctx.command_path.split()[1:]]  # the root is "toolkit" however it was started
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value == param.default or value in (None, (), {}) or param.name in ("version", "overwrite", "quiet"):
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
        elif isinstance(value, bool):
            if value or param.secondary_opts:  # a plain flag left off is not written
                words.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, dict):
            words += [w for old, new in value.items() for w in (param.opts[0], f"{old}={new}")]
        elif isinstance(value, tuple) and getattr(param, "multiple", False):
            words += [w for item in value for w in (param.opts[0], str(item))]
        elif isinstance(value, tuple):
            words += [param.opts[0], *(f"{item:g}" if isinstance(item, float) else str(item) for item in value)]
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def export_log_path(out: Path | None, source: str) -> Path:
    """Where TensorFlow's and tf2onnx's output goes for one export (replaced by the next one)."""
    name = (out.name if out is not None else Path(source).stem) or "model"
    return Path(tempfile.gettempdir()) / "toolkit-export" / f"{name}.log"


@contextlib.contextmanager
def _logged_to(log: Path, quiet: bool) -> Iterator[TextIO | bool]:
    """Everything the process writes to file descriptors 1 and 2 (TensorFlow's C++ logging, absl,
    oneDNN notices, tf2onnx's tracebacks and Python warnings) goes to ``log``, never to the terminal
    before an ``Error:`` line; yields the terminal for the progress display. A failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log, "wb") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield False if quiet else terminal
    except ToolkitError as e:
        raise type(e)(f"{e} (TensorFlow's and tf2onnx's output: {log})") from e
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        terminal.close()


def _check_keras_source(source: str, weights: Path | None) -> None:
    """What can be checked without TensorFlow, so a typo fails at once instead of after its import."""
    path = Path(source).expanduser()
    looks_like_path = path.suffix or "/" in source or source.startswith(".")
    if path.exists():
        return
    if looks_like_path:
        raise ExportError(f"Keras model {source} does not exist (a .keras/.h5 file or a SavedModel folder)")
    if source not in KERAS_APPLICATIONS:
        import difflib

        close = difflib.get_close_matches(source, KERAS_APPLICATIONS, n=3) or difflib.get_close_matches(
            source.lower(), [n.lower() for n in KERAS_APPLICATIONS], n=3)
        close = [n for n in KERAS_APPLICATIONS if n.lower() in {c.lower() for c in close}]
        raise ExportError(f"'{source}' is neither an existing file nor a Keras application"
                          + (f"; did you mean {', '.join(close)}?" if close
                             else f"; known applications: {', '.join(KERAS_APPLICATIONS)}"))
    if weights is not None and not weights.is_file():
        raise ExportError(f"weights file {weights} does not exist")


def _parse_aliases(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[str, str]:
    aliases = {}
    for value in values:
        old, sep, new = value.partition("=")
        if not sep or not old or not new:
            raise click.BadParameter(f"'{value}' is not OLD=NEW", ctx=ctx, param=param)
        aliases[old] = new
    return aliases


def _gate_options(command):
    """The accuracy gate of --quantize int8 and --fp16 (toolkit.export.quantize): unset thresholds
    take the scheme's defaults."""
    int8, fp16 = Gate(), FP16_GATE
    for option in reversed([
        click.option("--min-cosine", type=float, default=None,
                     help=f"Gate: lowest cosine between a sample's int8/fp16 and fp32 output [default: int8 "
                          f"{int8.min_cosine}, fp16 {fp16.min_cosine}]."),
        click.option("--min-mean-cosine", type=float, default=None,
                     help=f"Gate: lowest mean cosine over the samples [default: int8 {int8.min_mean_cosine}, "
                          f"fp16 {fp16.min_mean_cosine}]."),
        click.option("--min-rank", type=float, default=None,
                     help=f"Gate: lowest Spearman correlation (BERT: of the pairwise sentence similarities; "
                          f"Keras: of the output values) [default: int8 {int8.min_rank}, fp16 {fp16.min_rank}]."),
    ]):
        command = option(command)
    return command


def _gate(scheme: str | None, min_cosine: float | None, min_mean_cosine: float | None,
          min_rank: float | None) -> Gate:
    """The gate for ``scheme``, checked before TensorFlow loads (a bad threshold fails at once)."""
    if scheme is None and (min_cosine, min_mean_cosine, min_rank) != (None, None, None):
        raise ExportError("--min-cosine / --min-mean-cosine / --min-rank gate --quantize int8 or --fp16: give one")
    return (FP16_GATE if scheme == "fp16" else Gate()).with_overrides(min_cosine, min_mean_cosine, min_rank)


def _common_options(tolerance: float | None, rel_tolerance: float):
    def decorate(command):
        for option in reversed([
            click.option("--version", "version", type=click.IntRange(min=1), default=None,
                         help="Triton version folder to write: <out>/<version>/ [default: the next free "
                              "number, 1 for a new model]."),
            click.option("--tolerance", type=float, default=tolerance, show_default=True,
                         help="Also bound the max abs diff between onnxruntime and the source model "
                              "[default: no absolute bound]."),
            click.option("--rel-tolerance", type=float, default=rel_tolerance, show_default=True,
                         help="Max abs diff allowed relative to each output's peak |value| (per check case)."),
            click.option("--opset", type=click.IntRange(min=13), default=DEFAULT_OPSET, show_default=True,
                         help="ONNX opset to convert to."),
            click.option("--overwrite", is_flag=True, help="Replace an existing <out>/<version>/ folder."),
            click.option("--quiet", is_flag=True, help="No progress display, only the summary."),
        ]):
            command = option(command)
        return command

    return decorate


@click.group(name="export")
def export() -> None:
    """Export TensorFlow/Keras models to ONNX, checked against onnxruntime."""


@export.command("bert")
@click.argument("source", required=False, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=BERT_OUT, show_default=True,
              help="Triton model folder; the version folder is created inside it.")
@click.option("--lower-case/--no-lower-case", default=None,
              help="The vocab's do_lower_case. Default: tokenizer_config.json, else the folder name "
                   "('uncased', 'cased', chinese_L-12_H-768_A-12, ...).")
@click.option("--no-pooler", is_flag=True,
              help="Export only last_hidden_state (for checkpoints without bert/pooler weights).")
@click.option("--checkpoint", metavar="NAME", default=None,
              help="Google folder with several checkpoints (a training folder): the one to export, e.g. "
                   "model.ckpt-2000 (.index optional). Default: the only one, else the latest named by the "
                   "folder's 'checkpoint' state file, else the export fails listing them.")
@click.option("--quantize", type=click.Choice(["int8"]), default=None,
              help="Write an int8 model (MatMul weights per channel) if it passes the accuracy gate below "
                   "against the fp32 export on the calibration sentences; ~2x faster on CPU.")
@click.option("--fp16", is_flag=True, default=False,
              help="Write a float16 model (float32 inputs and outputs) for GPUs if it passes the accuracy gate "
                   "below against the fp32 export on the calibration sentences; half the size.")
@_gate_options
@_common_options(BERT_TOLERANCE, BERT_REL_TOLERANCE)
def bert(source: Path | None, out: Path, lower_case: bool | None, no_pooler: bool, checkpoint: str | None,
         quantize: str | None, fp16: bool, min_cosine: float | None, min_mean_cosine: float | None,
         min_rank: float | None, version: int | None, tolerance: float, rel_tolerance: float, opset: int,
         overwrite: bool, quiet: bool) -> None:
    """Export a BERT encoder to ONNX: SOURCE is a Google BERT checkpoint folder (bert_config.json,
    bert_model.ckpt.*, vocab.txt) or a Hugging Face folder (config.json, model.safetensors,
    vocab.txt); without SOURCE, the packaged all-MiniLM-L6-v2.

    Writes <out>/<version>/model.onnx, vocab.txt and export.json. Inputs input_ids, attention_mask,
    token_type_ids (INT64 [batch, sequence]); outputs last_hidden_state (FP32 [batch, sequence,
    hidden]) and pooler_output (FP32 [batch, hidden]).
    """
    if source is not None and not source.exists():
        raise ExportError(f"BERT source folder {source} does not exist")
    if quantize and fp16:
        raise ExportError("--quantize int8 and --fp16 exclude each other: int8 is for CPUs, fp16 for GPUs")
    quantize = "fp16" if fp16 else quantize
    gate = _gate(quantize, min_cosine, min_mean_cosine, min_rank)
    _quiet_tensorflow(quiet)
    with _logged_to(export_log_path(out, "bert"), quiet) as show:
        from toolkit.export.bert import export_bert

        report = export_bert(source, out, resolve_version(out, version, overwrite), tolerance=tolerance,
                             rel_tolerance=rel_tolerance, opset=opset, lower_case=lower_case,
                             with_pooler=not no_pooler, overwrite=overwrite,
                             show_progress=show, quantize=quantize, gate=gate, checkpoint=checkpoint)
    click.echo("\n".join(report.summary_lines()))


@export.command("keras")
@click.argument("source")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Triton model folder. Default: model_repository/<source name, lower case>.")
@click.option("--weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Applications only: a local weights file (default: random initialisation).")
@click.option("--include-top/--no-include-top", default=True, show_default=True,
              help="Applications only: keep the classifier head.")
@click.option("--pooling", type=click.Choice(["avg", "max", "none"]), default="none", show_default=True,
              help="Applications only, with --no-include-top: global pooling of the last feature map.")
@click.option("--input-size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Applications only: input height and width (NHWC, 3 channels).")
@click.option("--input-name", default=None, help="ONNX name of the model's only input (e.g. image).")
@click.option("--output-name", default=None, help="ONNX name of the model's only output (e.g. embedding).")
@click.option("--alias", "aliases", multiple=True, callback=_parse_aliases, metavar="OLD=NEW",
              help="Rename an input or output; repeatable.")
@click.option("--input-range", type=(float, float), default=None, metavar="LO HI",
              help="Values the model's inputs take in use (e.g. 0 255 for raw pixels): the check's inputs are "
                   "drawn there [default: the application's own; else -1 1].")
@click.option("--custom-module", "custom_modules", multiple=True, metavar="MODULE",
              help="Import MODULE first (registers custom Keras layers); repeatable.")
@click.option("--fp16", is_flag=True, default=False,
              help="Write a float16 model (float32 inputs and outputs) for GPUs if it passes the accuracy gate "
                   "below against the checked fp32 model on the check inputs.")
@_gate_options
@_common_options(KERAS_TOLERANCE, REL_TOLERANCE)
def keras(source: str, out: Path | None, weights: Path | None, include_top: bool, pooling: str,
          input_size: int, input_name: str | None, output_name: str | None, aliases: dict[str, str],
          input_range: tuple[float, float] | None, custom_modules: tuple[str, ...], fp16: bool,
          min_cosine: float | None, min_mean_cosine: float | None, min_rank: float | None, version: int | None,
          tolerance: float | None, rel_tolerance: float, opset: int, overwrite: bool, quiet: bool) -> None:
    """Export a Keras model to ONNX: SOURCE is a .keras/.h5 file, a TF SavedModel folder, or a
    keras.applications name such as MobileNetV2 (built with random weights unless --weights).

    Writes <out>/<version>/model.onnx and export.json.
    """
    _check_keras_source(source, weights)
    gate = _gate("fp16" if fp16 else None, min_cosine, min_mean_cosine, min_rank)
    _quiet_tensorflow(quiet)
    with _logged_to(export_log_path(out, source), quiet) as show:
        from toolkit.export.keras_models import export_keras

        report = export_keras(source, out, resolve_version(out, version, overwrite), weights=weights,
                              include_top=include_top,
                              pooling=None if pooling == "none" else pooling, input_size=input_size,
                              input_name=input_name, output_name=output_name, aliases=aliases,
                              custom_modules=custom_modules, tolerance=tolerance, rel_tolerance=rel_tolerance,
                              opset=opset, overwrite=overwrite, show_progress=show, input_range=input_range,
                              export_command=command_line(click.get_current_context()), fp16=fp16, gate=gate)
    click.echo("\n".join(report.summary_lines()))
