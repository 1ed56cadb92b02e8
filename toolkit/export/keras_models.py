"""``export_keras``: a Keras file, a TF SavedModel or a built-in Keras application -> ONNX.

Input and output names in the ONNX file are the model's own (input layer names, output layer
names or dict keys) unless aliased, the way Paddle Serving's feed/fetch alias dicts rename a
model's tensors to the names a service speaks (``--input-name image --output-name embedding``).
The image service's model is ``MobileNetV2(include_top=False, pooling="avg", weights=None)`` with
``image`` float32 [batch, 224, 224, 3] -> ``embedding`` float32 [batch, 1280].
"""

from __future__ import annotations

import dataclasses
import difflib
import gc
import importlib
import inspect
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import keras
import numpy as np
import onnx
import tensorflow as tf

from toolkit.errors import ExportError
from toolkit.export import images, onnx_check, probes, servable, tf_compat, verify
from toolkit.export.defaults import DEFAULT_OPSET, KERAS_TOLERANCE, REL_TOLERANCE
from toolkit.export.report import ExportReport
from toolkit.export.staging import check_version_target, staged_version_dir, write_json
from toolkit.export.steps import Steps
from toolkit.export.verify import CheckCase
from toolkit.lifecycle.golden import GOLDEN_FILE, write_golden

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


@dataclass
class KerasSource:
    """Anything with named tensor inputs and outputs that TensorFlow can trace.

    ``inputs`` holds (name, shape with None for dynamic dims, dtype); ``call`` maps a dict of input
    tensors to a dict of output tensors keyed by ``output_names``.
    """

    label: str
    inputs: list[tuple[str, tuple[int | None, ...], tf.DType]]
    output_names: list[str]
    call: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]
    describe_node: Callable[[str], str] = lambda name: f"node '{name}'"
    metadata: dict[str, Any] = field(default_factory=dict)
    #: A Keras model: traced with its weights as function inputs (``stateless_call``) so tf2onnx
    #: never holds them, and probed layer by layer when an output cannot discriminate.
    model: keras.Model | None = None


def keras_applications() -> list[str]:
    """Names of the built-in architectures (``MobileNetV2``, ``ResNet50``, ...)."""
    return sorted(n for n in dir(keras.applications)
                  if n[:1].isupper() and callable(getattr(keras.applications, n)))


def load_keras_source(source: str | Path, *, weights: Path | None = None, include_top: bool = True,
                      pooling: str | None = None, input_size: int = 224,
                      custom_modules: Sequence[str] = ()) -> KerasSource:
    """Resolve ``source``: an existing .keras/.h5 file or SavedModel folder, else an application name."""
    for module in custom_modules:
        try:
            importlib.import_module(module)
        except Exception as e:
            raise ExportError(f"cannot import custom-object module '{module}': {type(e).__name__}: {e}") from e
    path = Path(source)
    if path.exists():
        if path.is_dir():
            if (path / "saved_model.pb").exists():
                return _saved_model_source(path)
            raise ExportError(f"{path} is a folder without saved_model.pb: not a TF SavedModel")
        if path.suffix.lower() not in KERAS_SUFFIXES:
            raise ExportError(f"{path}: unsupported file type '{path.suffix}' "
                              f"(expected {', '.join(KERAS_SUFFIXES)} or a SavedModel folder)")
        return keras_model_source(_load_keras_file(path, trust_code=bool(custom_modules)), label=str(path))
    name = str(source)
    if name in keras_applications():
        return _application_source(name, weights, include_top, pooling, input_size)
    if path.suffix.lower() in KERAS_SUFFIXES or "/" in name or "\\" in name:
        raise ExportError(f"Keras model file {path} does not exist")
    hint = difflib.get_close_matches(name, keras_applications(), n=3)
    raise ExportError(f"'{name}' is neither an existing file nor a Keras application"
                      + (f" (did you mean {', '.join(hint)}?)" if hint else
                         f"; known applications: {', '.join(keras_applications())}"))


def _load_keras_file(path: Path, trust_code: bool = False) -> keras.Model:
    """``trust_code`` (``--custom-module`` was given: the user runs their own code anyway) also lets
    Keras rebuild Lambda layers, whose Python code it refuses to run from a file by default."""
    try:
        return keras.models.load_model(path, compile=False, safe_mode=not trust_code)
    except Exception as e:  # Keras raises ValueError/TypeError with long, nested messages
        text = str(e)
        unknown = re.search(r"(?:Unknown (?:layer|object|class)[^:']*: |Could not locate class )'([^']+)'", text)
        if unknown:
            raise ExportError(
                f"cannot load {path}: it uses the custom class '{unknown.group(1)}' that Keras does not know; "
                "register it with @keras.saving.register_keras_serializable in a module and pass "
                "--custom-module MODULE") from e
        if "safe_mode" in text or ("Lambda" in text and "lambda" in text):
            raise ExportError(
                f"cannot load {path}: it holds a Lambda layer, whose Python code Keras runs only when told to "
                "trust the file. If you do, pass --custom-module MODULE: it imports MODULE (the one that defines "
                "what the lambda calls; any module of yours will do) and lets Keras run the file's code") from e
        raise ExportError(f"cannot load {path} as a Keras model: {type(e).__name__}: {_first_line(text)}") from e


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else "(no message)"


def _application_source(name: str, weights: Path | None, include_top: bool, pooling: str | None,
                        input_size: int) -> KerasSource:
    if weights is not None and not Path(weights).is_file():
        raise ExportError(f"weights file {weights} does not exist (ImageNet weights cannot be downloaded here: "
                          "pass a local file, or no --weights for random initialisation)")
    if pooling not in (None, "avg", "max"):
        raise ExportError(f"pooling must be 'avg', 'max' or none, got '{pooling}'")
    try:
        model = getattr(keras.applications, name)(
            include_top=include_top, weights=str(weights) if weights else None, pooling=pooling,
            input_shape=(input_size, input_size, 3))
    except Exception as e:
        raise ExportError(f"cannot build keras.applications.{name}: {type(e).__name__}: {e}") from e
    source = keras_model_source(model, label=f"keras.applications.{name}")
    source.metadata.update({"application": name, "include_top": include_top, "pooling": pooling,
                            "input_size": input_size, "weights": str(weights) if weights else None})
    return source


def keras_model_source(model: keras.Model, label: str | None = None) -> KerasSource:
    """Wrap an in-memory Keras model: names come from its input layers and output layers/dict keys."""
    if not _has_symbolic_input(model):
        return _subclassed_source(model, label)
    if isinstance(model.input, dict):
        names = sorted(model.input)  # tf.nest flattens dicts in sorted-key order
    else:
        names = [_layer_name(t, f"input_{i}") for i, t in enumerate(tf.nest.flatten(model.input))]
    flat_inputs = tf.nest.flatten(model.input)
    inputs = [(n, tuple(t.shape), tf.as_dtype(t.dtype)) for n, t in zip(names, flat_inputs, strict=True)]
    if isinstance(model.output, dict):
        output_names = sorted(model.output)
    else:
        output_names = _unique([_layer_name(t, f"output_{i}") for i, t in enumerate(model.outputs)])

    def call(tensors: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        structured = tf.nest.pack_sequence_as(model.input, [tensors[n] for n in names])
        result = model(structured, training=False)
        if isinstance(result, dict):
            return dict(result)
        return dict(zip(output_names, tf.nest.flatten(result), strict=True))

    return KerasSource(label=label or f"Keras model '{model.name}'", inputs=inputs, output_names=output_names,
                       call=call, describe_node=_layer_describer(model), model=model)


def _subclassed_source(model: keras.Model, label: str | None) -> KerasSource:
    """A subclassed model has no symbolic inputs: its one input's shape is the one it was built or
    first called with (batch made dynamic), its outputs are named by a call on zeros."""
    shapes = dict(getattr(model, "_build_shapes_dict", None) or {})
    if len(shapes) != 1 or not model.built:
        raise ExportError(f"Keras model '{model.name}' is subclassed and its input is not known "
                          f"({'never built or called' if not shapes else f'{len(shapes)} build shapes'}): call it "
                          "once on an example batch (or build it with one input shape) before saving or exporting, "
                          "or wrap it in a functional model with keras.Input")
    (key, shape), = shapes.items()
    parameters = [n for n in inspect.signature(model.call).parameters if n not in ("training", "mask")]
    name = parameters[0] if parameters and _TENSOR_NAME.match(parameters[0]) else key.removesuffix("_shape")
    dims = (None, *tuple(shape)[1:])
    dtype = tf.as_dtype(getattr(model, "input_dtype", None) or "float32")
    probe = model(np.zeros([1 if d is None else d for d in dims], dtype.as_numpy_dtype), training=False)
    output_names = sorted(probe) if isinstance(probe, dict) else [
        f"output_{i}" for i in range(len(tf.nest.flatten(probe)))]

    def call(tensors: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        result = model(tensors[name], training=False)
        return dict(result) if isinstance(result, dict) else dict(zip(output_names, tf.nest.flatten(result),
                                                                          strict=True))

    return KerasSource(label=label or f"Keras model '{model.name}'", inputs=[(name, dims, dtype)],
                       output_names=output_names, call=call, describe_node=_layer_describer(model), model=model)


def _layer_name(tensor: Any, fallback: str) -> str:
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None)
    return getattr(operation, "name", None) or fallback


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    result = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        result.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return result


def _layer_describer(model: keras.Model) -> Callable[[str], str]:
    """TF node names carry the Keras layer's name scope (``functional_1/my_layer_1/Lgamma``)."""
    layers: dict[str, keras.layers.Layer] = {}
    stack = list(model.layers)
    while stack:
        layer = stack.pop()
        layers.setdefault(layer.name, layer)
        stack.extend(getattr(layer, "layers", []))

    def describe(node_name: str) -> str:
        for part in reversed(node_name.split("/")):
            for candidate in (part, re.sub(r"_\d+$", "", part)):
                if candidate in layers and candidate != model.name:
                    layer = layers[candidate]
                    return f"layer '{layer.name}' ({type(layer).__name__}, node '{node_name}')"
        return f"node '{node_name}'"

    return describe


def _saved_model_source(path: Path) -> KerasSource:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:
        raise ExportError(f"cannot load SavedModel {path}: {type(e).__name__}: {e}") from e
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise ExportError(f"SavedModel {path} has no 'serving_default' signature "
                          f"(it has: {', '.join(loaded.signatures) or 'none'})")
    specs = signature.structured_input_signature[1]
    inputs = [(name, tuple(spec.shape), spec.dtype) for name, spec in sorted(specs.items())]
    output_names = sorted(signature.structured_outputs)

    def call(tensors: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        _ = loaded  # keep the loaded object (and its variables) alive with the signature
        return dict(signature(**tensors))

    return KerasSource(label=str(path), inputs=inputs, output_names=output_names, call=call)


def resolve_aliases(input_names: Sequence[str], output_names: Sequence[str], input_name: str | None = None,
                    output_name: str | None = None, aliases: Mapping[str, str] | None = None) -> dict[str, str]:
    """Old name -> ONNX name for every input and output; every problem in one ``ExportError``."""
    mapping = {n: n for n in [*input_names, *output_names]}
    problems = []
    for new, names, kind, flag in ((input_name, input_names, "input", "--input-name"),
                                   (output_name, output_names, "output", "--output-name")):
        if new is None:
            continue
        if len(names) != 1:
            problems.append(f"{flag} needs a model with one {kind}, this one has {len(names)} "
                            f"({', '.join(names)}): use --alias OLD=NEW")
        else:
            mapping[names[0]] = new
    for old, new in (aliases or {}).items():
        if old not in mapping:
            problems.append(f"--alias {old}={new}: the model has no input or output '{old}' "
                            f"(inputs: {', '.join(input_names)}; outputs: {', '.join(output_names)})")
        else:
            mapping[old] = new
    bad = [n for n in mapping.values() if not _TENSOR_NAME.match(n)]
    if bad:
        problems.append(f"invalid tensor name(s) {', '.join(map(repr, bad))} "
                        "(letters, digits, '_', '.', '-'; not starting with a digit)")
    duplicates = sorted({n for n in mapping.values() if list(mapping.values()).count(n) > 1})
    if duplicates:
        problems.append(f"two tensors would both be named {', '.join(duplicates)}")
    if problems:
        raise ExportError("; ".join(problems))
    return mapping


def keras_check_cases(inputs: Sequence[tuple[str, tuple[int | None, ...], tf.DType]],
                      names: Mapping[str, str] | None = None, seed: int = 0,
                      value_range: tuple[float, float] | None = None) -> list[CheckCase]:
    """Random inputs for two batch sizes (1 and 3 when the batch is dynamic; three single examples
    when it is fixed), in each input's dtype, keyed by ``names[input]`` (the ONNX names). Examples
    differ in level and contrast as well as in their values, so that pooled features differ too.
    Image-like float inputs (NHWC, 1/3/4 channels) get smooth random images in ``value_range``
    (default [-1, 1]; ``toolkit.export.images``), other float inputs values around it."""
    rng = np.random.default_rng(seed)
    lo, hi = value_range or images.TF_MODE
    fixed_batch = any(shape[:1] != (None,) for _, shape, _ in inputs)
    plan = ((1, 32), (1, 32), (1, 32)) if fixed_batch else ((1, 32), (3, 47))
    cases = []
    for batch, free_dim in plan:
        arrays = {}
        for name, shape, dtype in inputs:
            dims = [(batch if i == 0 else free_dim) if d is None else d for i, d in enumerate(shape)]
            if dtype.is_floating and images.looks_like_images(shape):
                array = images.smooth_images(dims[0], (dims[1], dims[2]), value_range=(lo, hi), channels=dims[3],
                                             rng=rng).astype(dtype.as_numpy_dtype)
            else:
                array = _random_array(rng, dims, dtype, name, lo, hi)
            arrays[(names or {}).get(name, name)] = array
        shapes = ", ".join(f"{n}={list(a.shape)}" for n, a in arrays.items())
        cases.append(CheckCase(f"batch={batch} ({shapes})", arrays))
    return cases


def _random_array(rng: np.random.Generator, dims: list[int], dtype: tf.DType, name: str, lo: float = -1.0,
                  hi: float = 1.0) -> np.ndarray:
    if dtype.is_floating:
        per_example = [len(dims[:1]) and dims[0]] + [1] * (len(dims) - 1) if dims else []
        level, contrast = rng.uniform(-0.25, 0.25, size=per_example), rng.uniform(0.3, 1.0, size=per_example)
        unit = np.clip(level + contrast * rng.uniform(-1.0, 1.0, size=dims), -1.0, 1.0)
        return (lo + (hi - lo) * (unit + 1) / 2).astype(dtype.as_numpy_dtype)
    if dtype.is_bool:
        return rng.integers(0, 2, size=dims).astype(bool)
    if dtype.is_integer:
        high = 256 if dtype == tf.uint8 else 10
        return rng.integers(0, high, size=dims).astype(dtype.as_numpy_dtype)
    raise ExportError(f"input '{name}' has dtype {dtype.name}: only numeric and bool inputs can be exported")


def export_keras(source: str | Path, out_dir: Path | None = None, version: int = 1, *,
                 weights: Path | None = None, include_top: bool = True, pooling: str | None = None,
                 input_size: int = 224, input_name: str | None = None, output_name: str | None = None,
                 aliases: Mapping[str, str] | None = None, custom_modules: Sequence[str] = (),
                 tolerance: float = KERAS_TOLERANCE, rel_tolerance: float = REL_TOLERANCE,
                 opset: int = DEFAULT_OPSET, overwrite: bool = False, show_progress: bool | TextIO = False,
                 seed: int = 0, export_command: str | None = None,
                 input_range: tuple[float, float] | None = None) -> ExportReport:
    """Export a Keras file / SavedModel / application to ``<out_dir>/<version>/model.onnx``.

    ``out_dir`` defaults to ``model_repository/<lower-cased source name>``. ``weights``,
    ``include_top``, ``pooling`` and ``input_size`` apply to applications only (``weights=None``:
    random initialisation; nothing is downloaded).
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
                                   export_command=export_command, input_range=input_range)


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
                        input_range: tuple[float, float] | None = None) -> ExportReport:
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
        found = {}
        if blind and source.model is not None and _has_symbolic_input(source.model):
            tensors = dict(zip(source.output_names, tf.nest.flatten(source.model.output), strict=False))
            found = probes.find_probes(source.model, {n: tensors[n] for n in blind if n in tensors}, cases,
                                       input_names, names, tolerance, rel_tolerance)
            for case_expected, *values in zip(expected, *(v for _, _, v in found.values()), strict=True):
                case_expected.update(zip(found, values, strict=True))
    probe_names = {n: description for n, (_, description, _) in found.items()}
    with steps.step("convert", f"Converting with tf2onnx (opset {opset})"):
        onnx_model = _convert(source, names, found, opset)
        if release:
            label, metadata_of_source = source.label, source.metadata
            source = found = None  # the weights are in the ONNX model now
            gc.collect()
            source = KerasSource(label=label, inputs=[], output_names=[], call=None, metadata=metadata_of_source)
    inputs, outputs = onnx_check.tensor_infos(onnx_model)
    outputs = [t for t in outputs if t.name not in probe_names]
    metadata = {"kind": "keras", "source": source.label, **source.metadata,
                "aliases": {old: new for old, new in names.items() if old != new},
                "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs], "opset": opset}
    version_dir = Path(out_dir) / str(version)
    with staged_version_dir(Path(out_dir), version, overwrite) as staging:
        with steps.step("check", "Checking the ONNX against the source, as served and unoptimized"):
            holder = [onnx_model]
            del onnx_model  # _check frees it once written: only onnxruntime holds the weights from there on
            check = _check(holder, staging, probe_names, cases, expected, tolerance, rel_tolerance, nudged)
            servable.check_model_yaml(Path(out_dir), staging / "model.onnx")
        with steps.step("write", f"Writing {version_dir}"):
            metadata.update(check.to_dict())
            metadata["versions"] = onnx_check.tool_versions()
            metadata["timings_s"] = dict(steps.timings)
            write_json(staging / "export.json", metadata)
            if not check.blind_outputs:
                write_golden(staging / GOLDEN_FILE, check.golden_inputs, check.golden_outputs, tolerance,
                             rel_tolerance)
            written = sorted(p.name for p in staging.iterdir())
    files = [version_dir / name for name in written]
    model_yaml = (servable.write_model_yaml(Path(out_dir), version_dir / "model.onnx", export_command)
                  if export_command else None)
    return ExportReport(kind="keras", source=source.label, version_dir=version_dir,
                        model_path=version_dir / "model.onnx", metadata_path=version_dir / "export.json",
                        files=files, inputs=inputs, outputs=outputs, check=check, opset=opset,
                        timings=dict(steps.timings), metadata=metadata, model_yaml=model_yaml)


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
        outputs = source.call(dict(zip(input_names, args, strict=True)))
        return {names[k]: v for k, v in outputs.items()}

    return onnx_check.convert_function(serve, specs, opset=opset, dim_names=dims, describe_node=source.describe_node)


class _NotStateless(Exception):
    """The model cannot be called with its weights as arguments (a layer makes state as it runs)."""


def _convert_stateless(model: keras.Model, input_names, names, specs, dims, opset, describe_node):
    trainable, non_trainable = list(model.trainable_variables), list(model.non_trainable_variables)
    variables = trainable + non_trainable
    weight_names = _weight_names(variables, set(names.values()))
    weight_specs = [tf.TensorSpec(v.shape, v.dtype, name=n) for v, n in zip(variables, weight_names, strict=True)]
    structure = model.input if _has_symbolic_input(model) else None
    count = len(trainable)

    @tf.function(input_signature=specs + weight_specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        flat, weights = list(args[:len(specs)]), list(args[len(specs):])
        structured = tf.nest.pack_sequence_as(structure, flat) if structure is not None else (
            flat[0] if len(flat) == 1 else flat)
        result, _ = model.stateless_call(weights[:count], weights[count:], structured, training=False)
        if isinstance(result, dict):
            return {names.get(k, k): v for k, v in result.items()}
        output_names = [n for n in names if n not in input_names]
        return {names[k]: v for k, v in zip(output_names, tf.nest.flatten(result), strict=True)}

    try:
        with tf_compat.traceable_keras():
            serve.get_concrete_function()
    except Exception as e:
        raise _NotStateless(str(e)) from e
    lazy = {n: (lambda v=v: np.asarray(v.numpy())) for v, n in zip(variables, weight_names, strict=True)}
    return onnx_check.convert_function(serve, specs + weight_specs, opset=opset, dim_names=dims,
                                       describe_node=describe_node, initializers=lazy)


def _has_symbolic_input(model: keras.Model) -> bool:
    try:
        return model.input is not None
    except (AttributeError, ValueError):
        return False


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
    """Save the model (popped from ``holder``, so it is freed once written) into ``staging`` and check
    it from the file: one copy of the weights in memory at a time. Probes are checked in a scratch
    file, then stripped from model.onnx."""
    target = staging / "model.onnx"
    if not found:
        onnx_check.save_onnx(holder.pop(), target)
        return verify.check_onnx(target, cases, expected, tolerance, rel_tolerance, nudged=nudged)
    scratch = staging / "probed"
    scratch.mkdir()
    onnx_check.save_onnx(holder.pop(), scratch / "model.onnx")
    probed = verify.check_onnx(scratch / "model.onnx", cases, expected, tolerance, rel_tolerance, probes=found,
                               nudged=nudged)
    stripped = [onnx.load(str(scratch / "model.onnx"))]
    onnx_check.strip_outputs(stripped[0], list(found))
    onnx_check.save_onnx(stripped.pop(), target)
    shutil.rmtree(scratch)
    plain = [{k: v for k, v in e.items() if k not in found} for e in expected]
    served = verify.check_onnx(target, cases, plain, tolerance, rel_tolerance)
    return dataclasses.replace(probed, serving=probed.serving or served.serving)
