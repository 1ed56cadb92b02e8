"""From a fresh ONNX export to a servable model folder: the ``model.yaml`` beside the version folders.

``toolkit export ... --out model_repository/<model>`` writes ``<version>/model.onnx``; gen-repo also
needs ``model_repository/<model>/model.yaml``. This module writes a default one when the folder has
none (``write_model_yaml``) and, when it has one, checks that it still fits the new ONNX
(``check_model_yaml``) so that a re-export that renamed an output or lost its batch axis fails at
export time rather than at gen-repo or in Triton's log.

The spec is read and the ONNX file's inputs/outputs are compared by the same code gen-repo uses
(``toolkit.repository.project``); only the ONNX graph is read, never its external data. No TensorFlow here.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from toolkit.errors import ExportError, SpecError
from toolkit.repository.project import (
    MODEL_FILE,
    OnnxTensor,
    has_batch_axis,
    onnx_io_problems,
    onnx_tensor_specs,
    read_model_spec,
    read_onnx_io,
    read_onnx_shapes,
)
from toolkit.repository.spec import TensorSpec, check_model_name

#: max_batch_size of a default model.yaml. On CPU, onnxruntime's rows per second stop growing at
#: small batches (MobileNetV2 gains nothing past 4 on this project's 2-core machines, see
#: model_repository/mobilenet/model.yaml), while every request in a batch waits for the whole run
#: and the largest activations grow with it; 16 still lets a client send up to 16 rows in one
#: request (max_batch_size caps a request's rows too). Raise it for bulk clients or a GPU.
DEFAULT_MAX_BATCH_SIZE = 16
#: How many requests may wait in the batcher's queue before Triton refuses new ones at once.
DEFAULT_MAX_QUEUE_SIZE = 256
#: How long a request may wait in the queue (go-infer's MessageTimeout), as model_repository/bert.
DEFAULT_QUEUE_TIMEOUT_MICROSECONDS = 10_000_000
#: Model instances (go-infer's MaxWorkers). Two keep the cores busy while the other instance gathers
#: its batch, and with one instance Triton's batcher can leave a request queued for 500 ms
#: (gen-repo's note, BENCHMARKS.md "The 500 ms stall").
DEFAULT_INSTANCE_COUNT = 2


class _Mismatch(Exception):
    pass


def _fail(onnx_path: Path):
    def fail(message: str, field: str | None = None) -> ExportError:
        return ExportError(f"{onnx_path}: {message}")

    return fail


def _export_value(command: str) -> str:
    """``command`` without ``--out DIR`` (model.yaml's ``export`` omits it), as a YAML scalar."""
    command = " ".join(command.split())
    try:
        words = shlex.split(command)
    except ValueError:
        words = None
    if words and any(w == "--out" or w.startswith("--out=") for w in words):
        kept, skip = [], False
        for w in words:
            if skip:
                skip = False
            elif w == "--out":
                skip = True
            elif not w.startswith("--out="):
                kept.append(w)
        command = shlex.join(kept)
    try:
        plain = yaml.safe_load(f"export: {command}") == {"export": command}
    except yaml.YAMLError:
        plain = False
    return command if plain else json.dumps(command)  # a JSON string is a YAML double-quoted scalar


def _shape(t: OnnxTensor) -> str:
    return f"'{t.name}' {t.shape}"


def default_model_yaml(model_dir: Path, onnx_path: Path, export_command: str) -> str:
    """The text of a model.yaml that serves ``onnx_path`` (freshly exported into a version folder of
    ``model_dir``, or still staged) with gen-repo: batched when every input and output has a variable
    first axis, unbatched otherwise. ``export_command`` is the command that made it."""
    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    try:
        check_model_name(model_dir.name)
    except ValueError as e:
        raise ExportError(f"--out {model_dir}: the folder's name is the Triton model's name: {e}") from None
    inputs, outputs = read_onnx_shapes(onnx_path, _fail(onnx_path))
    tensors = inputs + outputs
    batched = has_batch_axis(tensors)
    for side in (inputs, outputs):  # what gen-repo refuses (a 0-d tensor without a batch axis)
        onnx_tensor_specs(side, DEFAULT_MAX_BATCH_SIZE if batched else 0, _fail(onnx_path), onnx_path.name)
    lines = [
        f"# Model '{model_dir.name}': serves <version>/{onnx_path.name} of this folder, which `toolkit export` writes.",
        "# The first export wrote this file and no export overwrites it; each one checks that it still fits",
        "# the new ONNX. Edit it, then run `toolkit gen-repo`. Worth tuning: max_batch_size, dynamic_batching,",
        "# instance_count (every field: toolkit/repository/spec.py; examples: model_repository/*/model.yaml). Inputs",
        "# and outputs are read from the ONNX file: declare inputs:/outputs: only to pin them.",
        "kind: onnx",
    ]
    if onnx_path.name != "model.onnx":
        lines.append(f"file: {json.dumps(onnx_path.name)}")
    lines += [
        "# The command that made the file; with `--out <this folder>` it exports it again (gen-repo says so",
        "# when the file is missing).",
        f"export: {_export_value(export_command)}",
    ]
    if batched:
        lines += [
            "# Every input and output has a variable first (batch) axis: Triton's dynamic batcher joins",
            "# requests into one onnxruntime run of up to max_batch_size rows, which also caps the rows of",
            f"# one request. {DEFAULT_MAX_BATCH_SIZE}: on CPU, throughput stops growing at small batches while",
            "# a run's latency keeps growing; raise it for bulk requests or a GPU.",
            f"max_batch_size: {DEFAULT_MAX_BATCH_SIZE}",
            "dynamic_batching:",
            "  # 0: batch whatever queued while the instances were busy, never wait when one is idle (a delay",
            "  # only adds latency on a CPU-bound machine).",
            "  max_queue_delay_microseconds: 0",
            f"  default_queue_policy:            # give up on a request after "
            f"{DEFAULT_QUEUE_TIMEOUT_MICROSECONDS // 1_000_000} s in the queue",
            "    timeout_action: REJECT",
            f"    default_timeout_microseconds: {DEFAULT_QUEUE_TIMEOUT_MICROSECONDS}",
            "    allow_timeout_override: true     # a caller's shorter deadline (request timeout) wins",
            f"    max_queue_size: {DEFAULT_MAX_QUEUE_SIZE}              # more waiting requests are refused at once",
        ]
    else:
        fixed = [t for t in tensors if not (t.shape and t.shape[0] == -1)]
        lines += [
            f"# No batching: {', '.join(_shape(t) for t in fixed)} "
            f"{'has' if len(fixed) == 1 else 'have'} no variable first (batch) axis. Triton",
            "# then hands each request to the model whole, in the file's full shapes, one run per request",
            "# (max_batch_size 0, so no dynamic_batching). Export with a variable batch axis to batch.",
            "max_batch_size: 0",
        ]
    lines += [
        "# Copies of the model that run requests in parallel. Each holds its own onnxruntime session (two",
        "# with the default adaptive threads, toolkit/runtime/onnx_hook.py): the weights sit in memory up",
        "# to 4 times. For a model too big for that set 1"
        + (", and remove default_queue_policy: with one instance" if batched else "."),
    ]
    if batched:
        lines.append("# and a queue policy a request can wait 500 ms (BENCHMARKS.md, \"The 500 ms stall\").")
    lines.append(f"instance_count: {DEFAULT_INSTANCE_COUNT}")
    return "\n".join(lines) + "\n"


def check_model_yaml(model_dir: Path, onnx_path: Path) -> None:
    """When ``model_dir`` has a model.yaml, check it against the freshly exported ``onnx_path`` as
    gen-repo will: the inputs/outputs it declares (names, dtypes, dims) and its max_batch_size
    (a batching model needs a variable first axis on every tensor). Raises one ExportError naming
    every mismatch. A model.yaml that declares no tensors is held to the newest version's ONNX (what
    gen-repo serves today), or with no version yet to the batch axis only."""
    model_dir, onnx_path = Path(model_dir), Path(onnx_path)
    file = model_dir / MODEL_FILE
    if not file.is_file():
        return
    way_out = (f"update {file} to the new model (or remove it, and the export writes a default one), "
               "or export the model it describes")
    try:
        spec = read_model_spec(model_dir)
    except SpecError as e:
        raise ExportError(f"{e}; fix it, or remove it and the export writes a default one") from None
    if spec.kind != "onnx":
        raise ExportError(f"{file} says kind: {spec.kind}, but the export wrote an ONNX model: {way_out}")
    if not spec.inputs and not spec.outputs:
        served = _newest_version(model_dir, spec.file, onnx_path)
        old = None
        if served is not None:  # the tensors the model is served with today: a new version keeps them
            try:
                old = read_onnx_io(served, spec.max_batch_size, _fail(served))
            except (SpecError, ExportError):
                old = None  # an old version gen-repo could not serve either: nothing to keep
        if old is not None:
            spec = spec.model_copy(update={"inputs": old[0], "outputs": old[1]})
            way_out = (f"a new version must keep the inputs and outputs of {served} (clients and ensembles call "
                       "them): export this model into another model folder (--out), or remove the old versions")
    inputs, outputs = read_onnx_shapes(onnx_path, _fail(onnx_path))
    label = "the new ONNX"
    problems: list[str] = []
    if spec.file != onnx_path.name:
        problems.append(f"declares file: {spec.file} but the export writes {onnx_path.name}")
    found: list[list[TensorSpec]] | None = None
    fixed = [t for t in inputs + outputs if not (t.shape and t.shape[0] == -1)]
    if spec.max_batch_size > 0 and fixed:
        problems.append(f"declares max_batch_size {spec.max_batch_size} but {label} has no variable first "
                        f"(batch) axis on {', '.join(_shape(t) for t in fixed)}: set max_batch_size: 0 and remove "
                        "dynamic_batching, or export with a variable batch axis")
        # Still compare the declared tensors, the first axis taken as the batch axis (unvalidated).
        found = [[TensorSpec.model_construct(name=t.name, dtype=t.dtype, dims=t.shape[1:], optional=False)
                  for t in side] for side in (inputs, outputs)]
    else:
        def mismatch(message: str, field: str | None = None) -> _Mismatch:
            return _Mismatch(message)

        try:
            found = [onnx_tensor_specs(side, spec.max_batch_size, mismatch, label) for side in (inputs, outputs)]
        except _Mismatch as e:  # a 0-d tensor without a batch axis
            problems.append(str(e))
    if found is not None:
        io = onnx_io_problems(spec, found[0], found[1], label)
        problems += [message for _, message in io]
        if not io and not problems:
            try:  # pad_inputs / trim_outputs name tensors and their variable dims
                spec.model_copy(update={"inputs": spec.inputs or found[0],
                                        "outputs": spec.outputs or found[1]}).check_padding()
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ExportError(f"{file}: {'; '.join(problems)}. The way out: {way_out}")


def _newest_version(model_dir: Path, file: str, new: Path) -> Path | None:
    versions = sorted((int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()
                       and (p / file).is_file() and (p / file).resolve() != new.resolve()), reverse=True)
    return model_dir / str(versions[0]) / file if versions else None


def write_model_yaml(model_dir: Path, onnx_path: Path, export_command: str) -> Path | None:
    """Write ``default_model_yaml`` to ``model_dir/model.yaml`` when there is none; returns its path,
    or None when a model.yaml exists (it is never overwritten: ``check_model_yaml`` checks it)."""
    file = Path(model_dir) / MODEL_FILE
    if file.exists():
        return None
    text = default_model_yaml(Path(model_dir), Path(onnx_path), export_command)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{MODEL_FILE}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(file)
    return file
