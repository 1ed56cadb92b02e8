"""What ``toolkit export keras`` can take, as one ``KerasSource``: a .keras/.h5 file, a TF SavedModel
folder, a ``keras.applications`` name, or an in-memory Keras model (functional, sequential or
subclassed); plus the names its tensors get in the ONNX file and the inputs it is checked on.

Input and output names in the ONNX file are the model's own (input layer names, output layer
names or dict keys) unless aliased, the way Paddle Serving's feed/fetch alias dicts rename a
model's tensors to the names a service speaks (``--input-name image --output-name embedding``).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from toolkit.errors import ExportError, first_line
from toolkit.export import images, tf_compat
from toolkit.export.verify import CheckCase

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
        raise ExportError(f"cannot load {path} as a Keras model: {type(e).__name__}: {first_line(text, 300)}") from e


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
    if not has_symbolic_input(model):
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
                       call=_in_graph(call, inputs), describe_node=_layer_describer(model), model=model)


def _in_graph(call: Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]],
              inputs: Sequence[tuple[str, tuple[int | None, ...], tf.DType]]
              ) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """``call`` run by TensorFlow's graph executor, traced once for every batch size.

    Keras' eager functional call keeps every intermediate tensor until the model's last layer has
    run; the graph executor frees each one once its readers have: ResNet152 at batch 3 peaked
    0.9 GB (4x its weights) higher eagerly. A model that cannot be traced runs eagerly (its export
    then fails in the converter, which traces it too, with the better error)."""
    specs = {name: tf.TensorSpec(shape, dtype, name=name) for name, shape, dtype in inputs}
    graph = tf.function(call, input_signature=[specs], autograph=False)
    eager = []

    def run(tensors: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        if not eager:
            try:
                with tf_compat.released_gradients():
                    return graph(tensors)
            except (TypeError, ValueError, NotImplementedError, AttributeError, tf.errors.OpError):
                eager.append(True)
        return call(tensors)

    return run


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
                       output_names=output_names, call=_in_graph(call, [(name, dims, dtype)]),
                       describe_node=_layer_describer(model), model=model)


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


def has_symbolic_input(model: keras.Model) -> bool:
    try:
        return model.input is not None
    except (AttributeError, ValueError):
        return False
