"""``export_keras``: a Keras file, a TF SavedModel or a built-in Keras application -> ONNX.

Input and output names in the ONNX file are the model's own (input layer names, output layer
names or dict keys) unless aliased, the way Paddle Serving's feed/fetch alias dicts rename a
model's tensors to the names a service speaks (``--input-name image --output-name embedding``).
The image service's model is ``MobileNetV2(include_top=False, pooling="avg", weights=None)`` with
``image`` float32 [batch, 224, 224, 3] -> ``embedding`` float32 [batch, 1280].
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from toolkit.errors import ExportError
from toolkit.export import onnx_check
from toolkit.export.defaults import DEFAULT_OPSET, KERAS_TOLERANCE, REL_TOLERANCE
from toolkit.export.onnx_check import CheckCase
from toolkit.export.report import ExportReport
from toolkit.export.staging import check_version_target, staged_version_dir, write_json
from toolkit.export.steps import Steps
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
        return keras_model_source(_load_keras_file(path), label=str(path))
    name = str(source)
    if name in keras_applications():
        return _application_source(name, weights, include_top, pooling, input_size)
    if path.suffix.lower() in KERAS_SUFFIXES or "/" in name or "\\" in name:
        raise ExportError(f"Keras model file {path} does not exist")
    hint = difflib.get_close_matches(name, keras_applications(), n=3)
    raise ExportError(f"'{name}' is neither an existing file nor a Keras application"
                      + (f" (did you mean {', '.join(hint)}?)" if hint else
                         f"; known applications: {', '.join(keras_applications())}"))


def _load_keras_file(path: Path) -> keras.Model:
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as e:  # Keras raises ValueError/TypeError with long, nested messages
        unknown = re.search(r"(?:Unknown (?:layer|object|class)[^:']*: |Could not locate class )'([^']+)'", str(e))
        if unknown:
            raise ExportError(
                f"cannot load {path}: it uses the custom class '{unknown.group(1)}' that Keras does not know; "
                "register it with @keras.saving.register_keras_serializable in a module and pass "
                "--custom-module MODULE") from e
        raise ExportError(f"cannot load {path} as a Keras model: {type(e).__name__}: {str(e)[:500]}") from e


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
                       call=call,
                       describe_node=_layer_describer(model))


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
                      names: Mapping[str, str] | None = None, seed: int = 0) -> list[CheckCase]:
    """Random inputs for two batch sizes (1 and 3 when the batch is dynamic), in each input's dtype,
    keyed by ``names[input]`` (the ONNX names)."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch, free_dim in ((1, 32), (3, 47)):
        arrays = {}
        for name, shape, dtype in inputs:
            dims = [(batch if i == 0 else free_dim) if d is None else d for i, d in enumerate(shape)]
            arrays[(names or {}).get(name, name)] = _random_array(rng, dims, dtype, name)
        shapes = ", ".join(f"{n}={list(a.shape)}" for n, a in arrays.items())
        cases.append(CheckCase(f"batch={batch} ({shapes})", arrays))
        if all(d is not None for _, shape, _ in inputs for d in shape):
            break  # a fixed-shape model has one possible input shape
    return cases


def _random_array(rng: np.random.Generator, dims: list[int], dtype: tf.DType, name: str) -> np.ndarray:
    if dtype.is_floating:
        return rng.uniform(-1.0, 1.0, size=dims).astype(dtype.as_numpy_dtype)
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
                 opset: int = DEFAULT_OPSET, overwrite: bool = False, show_progress: bool = False,
                 seed: int = 0) -> ExportReport:
    """Export a Keras file / SavedModel / application to ``<out_dir>/<version>/model.onnx``.

    ``out_dir`` defaults to ``model_repository/<lower-cased source name>``. ``weights``,
    ``include_top``, ``pooling`` and ``input_size`` apply to applications only (``weights=None``:
    random initialisation; nothing is downloaded).
    """
    out_dir = Path(out_dir) if out_dir is not None else Path("model_repository") / Path(str(source)).stem.lower()
    check_version_target(out_dir, version, overwrite)
    with Steps(show_progress) as steps:
        with steps.step("load", f"Loading {source}"):
            loaded = load_keras_source(source, weights=weights, include_top=include_top, pooling=pooling,
                                       input_size=input_size, custom_modules=custom_modules)
        return export_keras_source(loaded, out_dir, version, input_name=input_name, output_name=output_name,
                                   aliases=aliases, tolerance=tolerance, rel_tolerance=rel_tolerance,
                                   opset=opset, overwrite=overwrite, seed=seed, steps=steps)


def export_keras_model(model: keras.Model, out_dir: Path, version: int = 1, **options: Any) -> ExportReport:
    """``export_keras`` for an in-memory Keras model (same keyword options, minus the loading ones)."""
    check_version_target(Path(out_dir), version, options.get("overwrite", False))
    show = options.pop("show_progress", False)
    with Steps(show) as steps:
        return export_keras_source(keras_model_source(model), Path(out_dir), version, steps=steps, **options)


def export_keras_source(source: KerasSource, out_dir: Path, version: int, *, steps: Steps,
                        input_name: str | None = None, output_name: str | None = None,
                        aliases: Mapping[str, str] | None = None, tolerance: float = KERAS_TOLERANCE,
                        rel_tolerance: float = REL_TOLERANCE, opset: int = DEFAULT_OPSET,
                        overwrite: bool = False, seed: int = 0) -> ExportReport:
    """Convert, check and write any ``KerasSource``; the shared tail of ``export_keras*``."""
    input_names = [name for name, _, _ in source.inputs]
    output_names = source.output_names
    names = resolve_aliases(input_names, output_names, input_name, output_name, aliases)
    specs = [tf.TensorSpec(shape, dtype, name=names[name]) for name, shape, dtype in source.inputs]

    @tf.function(input_signature=specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        outputs = source.call(dict(zip(input_names, args, strict=True)))
        return {names[k]: v for k, v in outputs.items()}

    dims = {names[n]: ["batch" if i == 0 else f"{names[n]}_dim{i}" for i in range(len(s))]
            for n, s, _ in source.inputs}
    dims |= {names[n]: ["batch"] for n in output_names}
    with steps.step("convert", f"Converting with tf2onnx (opset {opset})"):
        onnx_model = onnx_check.convert_function(serve, specs, opset=opset, dim_names=dims,
                                                 describe_node=source.describe_node)
    with steps.step("check", "Comparing onnxruntime with the source model on random inputs"):
        cases = keras_check_cases(source.inputs, names, seed)

        def reference(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            by_natural = {n: tf.constant(arrays[names[n]]) for n in input_names}
            return {names[k]: np.asarray(v) for k, v in source.call(by_natural).items()}

        check = onnx_check.compare_with_onnxruntime(onnx_model, reference, cases, tolerance, rel_tolerance)
    inputs, outputs = onnx_check.tensor_infos(onnx_model)
    metadata = {
        "kind": "keras", "source": source.label, **source.metadata,
        "aliases": {old: new for old, new in names.items() if old != new},
        "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs],
        "opset": opset, **check.to_dict(), "versions": onnx_check.tool_versions(),
    }
    version_dir = Path(out_dir) / str(version)
    with steps.step("write", f"Writing {version_dir}"), \
            staged_version_dir(Path(out_dir), version, overwrite) as staging:
        onnx_check.save_onnx(onnx_model, staging / "model.onnx")
        metadata["timings_s"] = dict(steps.timings)
        write_json(staging / "export.json", metadata)
        write_golden(staging / GOLDEN_FILE, check.golden_inputs, check.golden_outputs, tolerance, rel_tolerance)
    files = [version_dir / "model.onnx", version_dir / "export.json"]
    return ExportReport(kind="keras", source=source.label, version_dir=version_dir, model_path=files[0],
                        metadata_path=files[1], files=files, inputs=inputs, outputs=outputs, check=check,
                        opset=opset, timings=dict(steps.timings), metadata=metadata)

