"""tf2onnx conversion shared by every exporter, and writing the ONNX file.

A ``tf.function`` with named ``tf.TensorSpec`` inputs (dynamic dims ``None``) becomes an ONNX
model; ``toolkit.export.verify`` then checks it against the source the way Triton will serve it.
Weights can be traced as inputs and bound afterwards (``initializers``): tf2onnx then never holds
them, which is what keeps an export's memory near a few times the weights' size.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from tf2onnx import constants as tf2onnx_constants

from toolkit.errors import ExportError, first_line
from toolkit.export import tf_compat
from toolkit.export.defaults import DEFAULT_OPSET
from toolkit.export.report import TensorInfo
from toolkit.export.verify import CheckCase, compare_with_onnxruntime  # noqa: F401  (the exporters' API)

Arrays = dict[str, np.ndarray]
_CATCH_ERRORS_ENV = tf2onnx_constants.ENV_TF2ONNX_CATCH_ERRORS
#: protobuf cannot serialize a message of 2 GiB or more; keep a margin for the graph itself.
_PROTOBUF_LIMIT = 2**31 - 2**26


def convert_function(function: tf.types.experimental.PolymorphicFunction,
                     input_specs: Sequence[tf.TensorSpec], opset: int = DEFAULT_OPSET,
                     dim_names: Mapping[str, Sequence[str | None]] | None = None,
                     describe_node: Callable[[str], str] | None = None,
                     initializers: Mapping[str, np.ndarray] | None = None,
                     defer: bool = False) -> onnx.ModelProto | Deferred:
    """Convert ``function`` (inputs named by ``input_specs``, outputs by its returned dict's keys).

    ``dim_names`` renames tf2onnx's ``unk__N`` symbolic dims per graph input/output
    (``{"input_ids": ["batch", "sequence"]}``). ``describe_node`` turns a TF node name into words
    for the error message (for Keras: which layer it belongs to). ``initializers`` names inputs of
    ``function`` that are really weights: they are converted as graph inputs and then bound to these
    arrays as ONNX initializers, so tf2onnx never handles the weights (see ``_from_function``).
    ``defer``: the callables among ``initializers`` are read only as the file is written (a
    ``Deferred``), so the weights are never in memory twice, in the source and in the model.
    """
    with tf_compat.traceable_keras(), tf_compat.released_gradients():
        try:  # tracing runs the user's Python: a layer that cannot be traced fails here
            concrete = function.get_concrete_function(*input_specs)
        except Exception as e:
            raise ExportError(f"TensorFlow cannot trace the model: {type(e).__name__}: {first_line(e)}") from e
        bound = {**tf_compat.captured_constants(concrete), **(initializers or {})}
        try:
            model = _from_function(function, input_specs, opset, catch_optimizer_errors=False)
        except Exception:
            try:  # the slow, forgiving path: tf2onnx skips any graph optimizer that fails
                model = _from_function(function, input_specs, opset, catch_optimizer_errors=True)
            except Exception as e:  # tf2onnx raises plain ValueError/KeyError/...: give the user the context
                raise ExportError(f"tf2onnx could not convert the model (opset {opset}): "
                                  f"{type(e).__name__}: {first_line(e)}") from e
    deferred = _bind_initializers(model, bound, defer)
    _raise_for_unconverted_ops(model, describe_node or (lambda name: f"node '{name}'"))
    _name_dims(model, dim_names or {})
    # onnx.checker runs on the written file (check_file): in memory it would copy the model twice
    return Deferred(model, deferred) if defer else model


def _from_function(function: tf.types.experimental.PolymorphicFunction, input_specs: Sequence[tf.TensorSpec],
                   opset: int, catch_optimizer_errors: bool) -> onnx.ModelProto:
    """tf2onnx.convert.from_function, quietly, in its large-model mode, and optionally without its
    optimizer safety net.

    Large-model mode keeps big constants out of the graph tf2onnx imports into TensorFlow and hands
    them back separately; they are put back into the model here. With TF2ONNX_CATCH_ERRORS on (its
    default), tf2onnx deep-copies the whole graph, weights included, before each of its optimizer
    passes so it can roll one back. Even without that, every pass re-copies each constant into its
    node's protobuf, and upb frees none of those copies until the conversion ends: a BERT-base
    (440 MB of weights) took 13 GB of memory; ``initializers`` brings it to under 4 GB and 20 s.
    """
    tf2onnx_logger = logging.getLogger("tf2onnx")
    previous_level, previous_env = tf2onnx_logger.level, os.environ.get(_CATCH_ERRORS_ENV)
    tf2onnx_logger.setLevel(logging.ERROR)
    os.environ[_CATCH_ERRORS_ENV] = "TRUE" if catch_optimizer_errors else "FALSE"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # tf2onnx 1.17 calls np.product
            model, storage = tf2onnx.convert.from_function(function, input_signature=list(input_specs),
                                                           opset=opset, large_model=True)
        _inline_external_tensors(model.graph, storage.name_to_tensor_data)
        return model
    finally:
        tf2onnx_logger.setLevel(previous_level)
        if previous_env is None:
            os.environ.pop(_CATCH_ERRORS_ENV, None)
        else:
            os.environ[_CATCH_ERRORS_ENV] = previous_env


def _bind_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray | Callable[[], np.ndarray]],
                       defer: bool = False) -> dict[str, Callable[[], np.ndarray]]:
    """Graph inputs named in ``arrays`` become initializers; initializers no node reads are dropped.

    A callable value is called only then, and its array is freed before the protobuf copy is made:
    at most two copies of one weight exist outside the model at any time (VGG16's 411 MB fc1 is
    the largest of any keras.applications model). With ``defer``, a callable whose graph input has a
    static shape is not called at all: its initializer is left without data, and the callables that
    fill them as the file is written (``Deferred``) are returned."""
    deferred = {}
    for value in list(model.graph.input):
        if value.name in arrays:
            model.graph.input.remove(value)
            tensor = model.graph.initializer.add()  # add(), not append(): append copies the message
            tensor.name = value.name
            source = arrays[value.name]
            dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
            if defer and callable(source) and None not in dims:
                tensor.data_type = value.type.tensor_type.elem_type
                tensor.dims.extend(dims)
                deferred[value.name] = source
                continue
            dtype, shape, raw = _raw(source)
            tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(dtype)
            tensor.dims.extend(shape)
            tensor.raw_data = raw
            del raw
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for initializer in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(initializer)
        deferred.pop(initializer.name, None)
    return deferred


@dataclasses.dataclass
class Deferred:
    """A converted model whose weights (``weights``: name -> a function reading it from the source)
    are read one at a time as the file is written (``write_onnx``), never all held in the model."""

    model: onnx.ModelProto
    weights: dict[str, Callable[[], np.ndarray]]

    def materialize(self) -> onnx.ModelProto:
        """The model with every weight in it (for the writers that need them all at once)."""
        for tensor in self.model.graph.initializer:
            if tensor.name in self.weights:
                tensor.raw_data = _checked_raw(tensor, self.weights.pop(tensor.name))
        return self.model


def _checked_raw(tensor: onnx.TensorProto, read: Callable[[], np.ndarray]) -> bytes:
    dtype, shape, raw = _raw(read)
    if onnx.helper.np_dtype_to_tensor_dtype(dtype) != tensor.data_type or list(shape) != list(tensor.dims):
        raise ExportError(f"internal: weight {tensor.name} is {dtype}{list(shape)}, its graph input says "
                          f"{onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)}{list(tensor.dims)}")
    return raw


def _raw(value: np.ndarray | Callable[[], np.ndarray]) -> tuple[np.dtype, tuple[int, ...], bytes]:
    array = np.ascontiguousarray(value() if callable(value) else value)
    if array.dtype.byteorder == ">" or array.dtype.kind in "OUS":
        raise ExportError(f"internal: cannot store a weight of dtype {array.dtype} as ONNX raw data")
    return array.dtype, array.shape, array.tobytes()


def _inline_external_tensors(graph: onnx.GraphProto, data: Mapping[str, bytes]) -> None:
    """Put tensors that tf2onnx's large-model mode left in ``data`` back into ``graph`` (one file)."""
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            tensors += [attribute.t, *attribute.tensors]
            for subgraph in [attribute.g, *attribute.graphs]:
                _inline_external_tensors(subgraph, data)
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(entry.value for entry in tensor.external_data if entry.key == "location")
            tensor.raw_data = data[location]
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT


def _raise_for_unconverted_ops(model: onnx.ModelProto, describe_node: Callable[[str], str]) -> None:
    """tf2onnx.from_function continues past TF ops it cannot map and leaves them in the graph as-is.

    Such a node has a TF op type in the ONNX domain; find all of them and name them.
    """
    bad = [node for node in model.graph.node
           if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)]
    if bad:
        details = "; ".join(f"TensorFlow op {n.op_type} in {describe_node(n.name)}" for n in bad)
        raise ExportError(f"{len(bad)} op(s) have no ONNX equivalent in tf2onnx {tf2onnx.__version__}: {details}")


def _name_dims(model: onnx.ModelProto, dim_names: Mapping[str, Sequence[str | None]]) -> None:
    for value in [*model.graph.input, *model.graph.output]:
        names = dim_names.get(value.name)
        if not names:
            continue
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=False):
            if name and not dim.HasField("dim_value"):
                dim.dim_param = name


def tensor_infos(model: onnx.ModelProto) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph's inputs and outputs with Triton-style dims (-1 = dynamic)."""

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor_type = value.type.tensor_type
        dims = tensor_type.shape.dim
        return TensorInfo(
            name=value.name,
            dtype=onnx.TensorProto.DataType.Name(tensor_type.elem_type),
            shape=tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims),
            dim_names=tuple(d.dim_param for d in dims),
        )

    initializers = {i.name for i in model.graph.initializer}
    inputs = [info(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [info(v) for v in model.graph.output]


def save_onnx(model: onnx.ModelProto, path: Path) -> list[Path]:
    """Write ``model`` to ``path`` and check the file with onnx.checker; a model past protobuf's 2 GB
    limit keeps its weights in ``<path>.data`` beside it (ONNX external data: onnxruntime and Triton
    load both). Returns the files. Pass a model nobody else holds (``holder.pop()``): it is freed
    before the checker reads the file back."""
    files = write_onnx(model, path)
    del model
    check_file(path)
    return files


def write_onnx(model: onnx.ModelProto | Deferred, path: Path,
               extra_initializers: Sequence[onnx.TensorProto] = ()) -> list[Path]:
    """Write ``model``, with ``extra_initializers`` (tensors of another model, e.g. the weights held
    out of an optimizer) added to its graph in the file without copying them in memory. A
    ``Deferred`` model's weights are read and written one at a time."""
    path = Path(path)
    deferred = {}
    if isinstance(model, Deferred):
        deferred, model = model.weights, model.model
        if weights_bytes(model) + sum(tensor_bytes(t) for t in extra_initializers) >= _PROTOBUF_LIMIT:
            model, deferred = Deferred(model, deferred).materialize(), {}
    try:
        if weights_bytes(model) + sum(tensor_bytes(t) for t in extra_initializers) >= _PROTOBUF_LIMIT:
            model.graph.initializer.extend(extra_initializers)  # a copy: only models past 2 GB
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
            return [path, path.with_name(f"{path.name}.data")]
        _write_streamed(model, path, extra_initializers, deferred)
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot write {path}: {e}") from e
    return [path]


def check_file(path: Path) -> None:
    """onnx.checker on the written file (it reads the file itself: no copy of the model in Python)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"tf2onnx produced an invalid ONNX model: {first_line(e)}") from e
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read back {path}: {e}") from e


def _write_streamed(model: onnx.ModelProto, path: Path, extra: Sequence[onnx.TensorProto] = (),
                    deferred: Mapping[str, Callable[[], np.ndarray]] | None = None) -> None:
    """``onnx.save`` without its memory: serializing a whole model at once holds the weights about
    four times over (upb grows its buffer by doubling, then copies it into Python bytes). The same
    bytes a parser reads are written piece by piece: the model without its graph, then the graph
    field's header, the graph without its initializers, and each initializer (protobuf fields may
    come in any order)."""
    graph = model.graph
    head, rest = copy_without(model, "graph"), copy_without(graph, "initializer")
    rest_bytes = rest.SerializeToString()
    deferred = deferred or {}
    tensors = [*graph.initializer, *extra]

    def size(tensor: onnx.TensorProto) -> int:
        if tensor.name not in deferred:
            return tensor.ByteSize()
        n = tensor_bytes(tensor)  # its raw_data, written after the rest (field 9: the last one set)
        return tensor.ByteSize() + 1 + len(_varint(n)) + n

    sizes = [size(tensor) for tensor in tensors]
    graph_size = len(rest_bytes) + sum(1 + len(_varint(n)) + n for n in sizes)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        f.write(b"\x3a" + _varint(graph_size))  # field 7 (graph), length-delimited
        f.write(rest_bytes)
        for tensor, size in zip(tensors, sizes, strict=True):
            f.write(b"\x2a" + _varint(size))  # GraphProto field 5 (initializer)
            f.write(tensor.SerializeToString())
            if tensor.name in deferred:
                raw = _checked_raw(tensor, deferred[tensor.name])
                f.write(b"\x4a" + _varint(len(raw)))  # TensorProto field 9 (raw_data)
                f.write(raw)
                del raw


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's data size from its dims and type (0 for strings), without touching the data."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return 0
    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def copy_without(message: Any, skip: str) -> Any:
    """A copy of a protobuf ``message`` without its field ``skip`` (a model without its graph, a graph
    without its initializers: the small part, without copying the weights)."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(copy, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def weights_bytes(model: onnx.ModelProto) -> int:
    """The initializers' size, from their dims (``ByteSize()`` would serialize the whole model)."""
    return sum(tensor_bytes(tensor) for tensor in model.graph.initializer)


def strip_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Remove graph outputs ``names`` (the check's probes) and every node and initializer that only
    they needed."""
    for output in [o for o in model.graph.output if o.name in set(names)]:
        model.graph.output.remove(output)
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del model.graph.node[:]
    model.graph.node.extend(keep)
    for initializer in [i for i in model.graph.initializer if i.name not in needed]:
        model.graph.initializer.remove(initializer)


def tool_versions() -> dict[str, str]:
    """Recorded in export.json: an ONNX file's numbers depend on the converter that wrote it."""
    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}
