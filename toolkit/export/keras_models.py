"""``export_keras``: a Keras file, a TF SavedModel or a built-in Keras application -> ONNX.

The source (``toolkit.export.keras_sources``) is traced with its weights as function inputs
(Keras' ``stateless_call``) so tf2onnx never holds them, converted, written, folded
(``toolkit.export.fold``) and checked from the file against the source (``toolkit.export.verify``),
with probes when an output cannot discriminate.
The image service's model is ``MobileNetV2(include_top=False, pooling="avg", weights=None)`` with
``image`` float32 [batch, 224, 224, 3] -> ``embedding`` float32 [batch, 1280].
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np
import onnx
import tensorflow as tf

from toolkit.errors import ExportError, first_line
from toolkit.export import fold, images, memory, onnx_check, probes, servable, tf_compat, verify
from toolkit.export.defaults import DEFAULT_OPSET, KERAS_TOLERANCE, REL_TOLERANCE
from toolkit.export.keras_sources import (  # noqa: F401  (keras_applications, keras_check_cases: public API)
    KerasSource,
    has_symbolic_input,
    keras_applications,
    keras_check_cases,
    keras_model_source,
    load_keras_source,
    resolve_aliases,
)
from toolkit.export.quantize import FP16_GATE, Gate, QuantizationReport, own_golden
from toolkit.export.report import ExportReport
from toolkit.export.staging import check_version_target, staged_version_dir, write_json
from toolkit.export.steps import Steps
from toolkit.lifecycle.golden import GOLDEN_FILE, write_golden

log = logging.getLogger(__name__)


def export_keras(source: str | Path, out_dir: Path | None = None, version: int = 1, *,
                 weights: Path | None = None, include_top: bool = True, pooling: str | None = None,
                 input_size: int = 224, input_name: str | None = None, output_name: str | None = None,
                 aliases: Mapping[str, str] | None = None, custom_modules: Sequence[str] = (),
                 tolerance: float = KERAS_TOLERANCE, rel_tolerance: float = REL_TOLERANCE,
                 opset: int = DEFAULT_OPSET, overwrite: bool = False, show_progress: bool | TextIO = False,
                 seed: int = 0, export_command: str | None = None,
                 input_range: tuple[float, float] | None = None, fp16: bool = False,
                 gate: Gate | None = None) -> ExportReport:
    """Export a Keras file / SavedModel / application to ``<out_dir>/<version>/model.onnx``.

    ``out_dir`` defaults to ``model_repository/<lower-cased source name>``. ``weights``,
    ``include_top``, ``pooling`` and ``input_size`` apply to applications only (``weights=None``:
    random initialisation; nothing is downloaded). ``fp16``: write the checked model as float16
    (float32 inputs and outputs) if it passes ``gate`` against it (``toolkit.export.half``).
    """
    out_dir = Path(out_dir) if out_dir is not None else Path("model_repository") / Path(str(source)).stem.lower()
    check_version_target(out_dir, version, overwrite)
    with Steps(show_progress) as steps:
        with steps.step("load", f"Loading {source}"):
            loaded = [load_keras_source(source, weights=weights, include_top=include_top, pooling=pooling,
                                        input_size=input_size, custom_modules=custom_modules)]
        # pop: the only reference is the callee's, which lets go of the model once it is converted
        return export_keras_source(loaded.pop(), out_dir, version, input_name=input_name, output_name=output_name,
                                   aliases=aliases, tolerance=tolerance, rel_tolerance=rel_tolerance,
                                   opset=opset, overwrite=overwrite, seed=seed, steps=steps, release=True,
                                   export_command=export_command, input_range=input_range, fp16=fp16,
                                   gate=gate)


def export_keras_model(model: keras.Model, out_dir: Path, version: int = 1, **options: Any) -> ExportReport:
    """``export_keras`` for an in-memory Keras model (same keyword options, minus the loading ones)."""
    check_version_target(Path(out_dir), version, options.get("overwrite", False))
    show = options.pop("show_progress", False)
    with Steps(show) as steps:
        return export_keras_source(keras_model_source(model), Path(out_dir), version, steps=steps, **options)


def export_keras_source(source: KerasSource, out_dir: Path, version: int, *, steps: Steps,
                        input_name: str | None = None, output_name: str | None = None,
                        aliases: Mapping[str, str] | None = None, tolerance: float | None = KERAS_TOLERANCE,
                        rel_tolerance: float = REL_TOLERANCE, opset: int = DEFAULT_OPSET,
                        overwrite: bool = False, seed: int = 0, release: bool = False,
                        export_command: str | None = None,
                        input_range: tuple[float, float] | None = None, fp16: bool = False,
                        gate: Gate | None = None) -> ExportReport:
    """Convert, check and write any ``KerasSource``; the shared tail of ``export_keras*``.

    ``release``: the source is ours alone (``export_keras`` loaded it): drop it once converted, so
    its weights are not in memory while the file is written and onnxruntime checks it.
    ``export_command``: write ``<out_dir>/model.yaml`` for it when there is none (an existing one is
    always checked against the new ONNX, and a mismatch fails the export)."""
    input_names = [name for name, _, _ in source.inputs]
    names = resolve_aliases(input_names, source.output_names, input_name, output_name, aliases)
    with steps.step("reference", "Running the source model on the check inputs"):
        application = source.metadata.get("application")
        value_range = input_range or (images.input_range(application) if application else None)
        cases = keras_check_cases(source.inputs, names, seed, value_range)

        def reference(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            by_natural = {n: tf.constant(arrays[names[n]]) for n in input_names}
            return {names[k]: np.asarray(v) for k, v in source.call(by_natural).items()}

        expected = verify.reference_outputs(reference, cases)
        nudged = verify.nudged_outputs(reference, cases)  # only read if the check fails: is the source stable?
        blind = [n for n in source.output_names
                 if not verify.discriminates([e[names[n]] for e in expected], tolerance, rel_tolerance)]
        found = _find_probes(source, blind, cases, expected, names, tolerance, rel_tolerance) if blind else {}
    probe_names = {n: description for n, (_, description, _) in found.items()}
    label = source.label
    metadata = {"kind": "keras", "source": label, **source.metadata,
                "aliases": {old: new for old, new in names.items() if old != new}}
    with steps.step("convert", f"Converting with tf2onnx (opset {opset})"):
        onnx_model = _convert(source, names, found, opset)
        if release:
            source = found = reference = None  # the weights are in the ONNX model now
        memory.release()
    inputs, outputs = onnx_check.tensor_infos(
        onnx_model.model if isinstance(onnx_model, onnx_check.Deferred) else onnx_model)
    outputs = [t for t in outputs if t.name not in probe_names]
    metadata |= {"inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs],
                 "opset": opset}
    version_dir = Path(out_dir) / str(version)
    with staged_version_dir(Path(out_dir), version, overwrite) as staging:
        with steps.step("check", "Checking the ONNX against the source, as served and unoptimized"):
            holder = [onnx_model]
            del onnx_model  # _check frees it once written: only onnxruntime holds the weights from there on
            check = _check(holder, staging, probe_names, cases, expected, tolerance, rel_tolerance, nudged)
            memory.release()  # reading the graph back parses the whole file
            servable.check_model_yaml(Path(out_dir), staging / "model.onnx")
        half = None
        if fp16:
            with steps.step("fp16", "Converting to float16 and checking it against fp32 on the check inputs"):
                half = _to_fp16(staging, [c.inputs for c in cases], gate or FP16_GATE)
                metadata["quantization"] = half.to_dict()
        with steps.step("write", f"Writing {version_dir}"):
            metadata.update(check.to_dict())
            metadata["versions"] = onnx_check.tool_versions()
            metadata["timings_s"] = dict(steps.timings)
            write_json(staging / "export.json", metadata)
            if not check.blind_outputs:
                golden = ((check.golden_outputs, tolerance, rel_tolerance) if half is None
                          else own_golden(staging / "model.onnx", check.golden_inputs))
                write_golden(staging / GOLDEN_FILE, check.golden_inputs, *golden)
            written = sorted(p.name for p in staging.iterdir())
    files = [version_dir / name for name in written]
    model_yaml = (servable.write_model_yaml(Path(out_dir), version_dir / "model.onnx", export_command)
                  if export_command else None)
    return ExportReport(kind="keras", source=label, version_dir=version_dir,
                        model_path=version_dir / "model.onnx", metadata_path=version_dir / "export.json",
                        files=files, inputs=inputs, outputs=outputs, check=check, opset=opset,
                        timings=dict(steps.timings), metadata=metadata, model_yaml=model_yaml,
                        quantization=half.summary_line() if half is not None else None)


def _to_fp16(staging: Path, feeds: list[dict[str, np.ndarray]], gate: Gate) -> QuantizationReport:
    """Replace the checked fp32 ``staging/model.onnx`` (and its .data) by its float16 copy, gated."""
    from toolkit.export.half import half_outputs

    fp32 = staging / "fp32"
    fp32.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        if (staging / name).exists():
            (staging / name).replace(fp32 / name)
    report = half_outputs(fp32 / "model.onnx", staging / "model.onnx", feeds, gate=gate)
    shutil.rmtree(fp32)
    return report


def _find_probes(source: KerasSource, blind: Sequence[str], cases, expected: list[dict[str, np.ndarray]],
                 names: Mapping[str, str], tolerance, rel_tolerance) -> dict[str, tuple]:
    """Probes for the ``blind`` outputs (``toolkit.export.probes``), their values added to ``expected``."""
    if source.model is None or not has_symbolic_input(source.model):
        return {}
    tensors = dict(zip(source.output_names, tf.nest.flatten(source.model.output), strict=False))
    found = probes.find_probes(source.model, {n: tensors[n] for n in blind if n in tensors}, cases,
                               [name for name, _, _ in source.inputs], names, tolerance, rel_tolerance)
    for case_expected, *values in zip(expected, *(v for _, _, v in found.values()), strict=True):
        case_expected.update(zip(found, values, strict=True))
    return found


def _convert(source: KerasSource, names: Mapping[str, str], found: Mapping[str, tuple], opset: int):
    """Trace and convert; a Keras model with its weights as inputs (bound back as initializers),
    anything else (a SavedModel signature) with its variables frozen by tf2onnx."""
    input_names = [name for name, _, _ in source.inputs]
    specs = [tf.TensorSpec(shape, dtype, name=names[name]) for name, shape, dtype in source.inputs]
    dims = {names[n]: ["batch" if i == 0 else f"{names[n]}_dim{i}" for i in range(len(s))]
            for n, s, _ in source.inputs}
    dims |= {names[n]: ["batch"] for n in source.output_names} | {n: ["batch"] for n in found}
    model = source.model
    if found:
        outputs = dict(zip(source.output_names, tf.nest.flatten(model.output), strict=True))
        model = keras.Model(model.input, {**outputs, **{n: t for n, (t, _, _) in found.items()}})
    if model is not None:
        try:
            return _convert_stateless(model, input_names, names, specs, dims, opset, source.describe_node)
        except _NotStateless:
            pass

    @tf.function(input_signature=specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        if model is None:  # a SavedModel signature
            outputs = source.call(dict(zip(input_names, args, strict=True)))
            return {names[k]: v for k, v in outputs.items()}
        return _named_outputs(model(_structured(model, list(args)), training=False), names, input_names)

    return onnx_check.convert_function(serve, specs, opset=opset, dim_names=dims, describe_node=source.describe_node)


class _NotStateless(Exception):
    """The model cannot be called with its weights as arguments (a layer makes state as it runs)."""


def _convert_stateless(model: keras.Model, input_names, names, specs, dims, opset, describe_node):
    trainable, non_trainable = list(model.trainable_variables), list(model.non_trainable_variables)
    variables = trainable + non_trainable
    weight_names = _weight_names(variables, set(names.values()))
    weight_specs = [tf.TensorSpec(v.shape, v.dtype, name=n) for v, n in zip(variables, weight_names, strict=True)]
    count = len(trainable)

    @tf.function(input_signature=specs + weight_specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        flat, weights = list(args[:len(specs)]), list(args[len(specs):])
        result, _ = model.stateless_call(weights[:count], weights[count:], _structured(model, flat), training=False)
        return _named_outputs(result, names, input_names)

    try:
        with tf_compat.traceable_keras(), tf_compat.released_gradients():
            serve.get_concrete_function()
    except Exception as e:
        raise _NotStateless(str(e)) from e
    lazy = {n: (lambda v=v: np.asarray(v.numpy())) for v, n in zip(variables, weight_names, strict=True)}
    return onnx_check.convert_function(serve, specs + weight_specs, opset=opset, dim_names=dims,
                                       describe_node=describe_node, initializers=lazy, defer=True)


def _structured(model: keras.Model, flat: list) -> Any:
    """The model's inputs as it takes them: its own structure, or the one tensor of a subclassed model."""
    if has_symbolic_input(model):
        return tf.nest.pack_sequence_as(model.input, flat)
    return flat[0] if len(flat) == 1 else flat


def _named_outputs(result: Any, names: Mapping[str, str], input_names: Sequence[str]) -> dict[str, tf.Tensor]:
    if isinstance(result, dict):
        return {names.get(k, k): v for k, v in result.items()}
    output_names = [n for n in names if n not in input_names]
    return {names[k]: v for k, v in zip(output_names, tf.nest.flatten(result), strict=True)}


def _weight_names(variables: Sequence[Any], taken: set[str]) -> list[str]:
    """ONNX initializer names from the variables' Keras paths (``block1_conv1/kernel``), unique."""
    result, seen = [], set(taken)
    for i, variable in enumerate(variables):
        base = re.sub(r"[^A-Za-z0-9_.\-/]", "_", str(getattr(variable, "path", "") or f"weight_{i}")).lstrip("/._-")
        name, n = base or f"weight_{i}", 1
        while name in seen:
            n += 1
            name = f"{base}_{n}"
        seen.add(name)
        result.append(name)
    return result


def _check(holder: list, staging: Path, found: Mapping[str, str], cases, expected, tolerance, rel_tolerance,
           nudged):
    """Save the model (popped from ``holder``, so it is freed once written) into ``staging``, fold it
    (fold.py) and check it from the file: one copy of the weights in memory at a time. Probes are
    checked in a scratch file, then stripped from model.onnx."""
    target = staging / "model.onnx"
    if not found:
        _save_folded(holder, target)
        return _check_folded(target, cases, expected, tolerance, rel_tolerance, nudged=nudged)
    scratch = staging / "probed"
    scratch.mkdir()
    _save_folded(holder, scratch / "model.onnx")
    probed = _check_folded(scratch / "model.onnx", cases, expected, tolerance, rel_tolerance, probes=found,
                           nudged=nudged)
    memory.release()
    stripped = [onnx.load(str(scratch / "model.onnx"))]
    onnx_check.strip_outputs(stripped[0], list(found))
    onnx_check.save_onnx(stripped.pop(), target)
    shutil.rmtree(scratch)
    plain = [{k: v for k, v in e.items() if k not in found} for e in expected]
    served = verify.check_onnx(target, cases, plain, tolerance, rel_tolerance)
    return dataclasses.replace(probed, serving=probed.serving or served.serving)


def _save_folded(holder: list[onnx.ModelProto], path: Path) -> None:
    """Write the model popped from ``holder`` (freed once written, before the file is read back) and
    fold it in place; the unfolded file stays beside it (a hard link, no copy) under ``unfolded/``
    until the check has passed."""
    onnx_check.write_onnx(holder[0], path)
    holder.clear()
    memory.release()
    onnx_check.check_file(path)
    keep = path.parent / "unfolded"
    keep.mkdir()
    for file in (path, path.with_name(f"{path.name}.data")):
        if file.exists():
            os.link(file, keep / file.name)
    if not fold.fold_file(path):
        shutil.rmtree(keep)


def _check_folded(path: Path, *args, **kwargs):
    """``verify.check_onnx`` on the folded file; when it fails but the unfolded one passes, the
    folding was wrong (an optimizer bug): keep the unfolded file, and say so in the log."""
    keep = path.parent / "unfolded"
    try:
        result = verify.check_onnx(path, *args, **kwargs)
    except ExportError as e:
        if not keep.exists():
            raise
        log.warning("the folded graph fails the check (%s); checking the unfolded one", first_line(e))
        path.with_name(f"{path.name}.data").unlink(missing_ok=True)
        for file in keep.iterdir():
            file.replace(path.parent / file.name)
        keep.rmdir()
        return verify.check_onnx(path, *args, **kwargs)
    shutil.rmtree(keep, ignore_errors=True)
    return result
