"""tf2onnx conversion and the onnxruntime-versus-source check shared by every exporter.

An ONNX file is only worth writing if it computes what the source computes. After converting a
``tf.function`` with named ``tf.TensorSpec`` inputs (dynamic dims ``None``), the model is run with
onnxruntime on generated inputs next to the source, and every output that disagrees in any case is
reported in one ``ExportError`` (the Hugging Face optimum exporter's validation step).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import tensorflow as tf
import tf2onnx
from tf2onnx import constants as tf2onnx_constants

from toolkit.errors import ExportError
from toolkit.export.defaults import DEFAULT_OPSET
from toolkit.export.report import CheckResult, TensorInfo

Arrays = dict[str, np.ndarray]
_CATCH_ERRORS_ENV = tf2onnx_constants.ENV_TF2ONNX_CATCH_ERRORS


@dataclass(frozen=True)
class CheckCase:
    """One set of generated inputs, with a label that says what it exercises ("batch=3 seq=17")."""

    label: str
    inputs: Arrays


def convert_function(function: tf.types.experimental.PolymorphicFunction,
                     input_specs: Sequence[tf.TensorSpec], opset: int = DEFAULT_OPSET,
                     dim_names: Mapping[str, Sequence[str | None]] | None = None,
                     describe_node: Callable[[str], str] | None = None,
                     initializers: Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Convert ``function`` (inputs named by ``input_specs``, outputs by its returned dict's keys).

    ``dim_names`` renames tf2onnx's ``unk__N`` symbolic dims per graph input/output
    (``{"input_ids": ["batch", "sequence"]}``). ``describe_node`` turns a TF node name into words
    for the error message (for Keras: which layer it belongs to). ``initializers`` names inputs of
    ``function`` that are really weights: they are converted as graph inputs and then bound to these
    arrays as ONNX initializers, so tf2onnx never handles the weights (see ``_from_function``).
    """
    try:
        model = _from_function(function, input_specs, opset, catch_optimizer_errors=False)
    except Exception:
        try:  # the slow, forgiving path: tf2onnx skips any graph optimizer that fails
            model = _from_function(function, input_specs, opset, catch_optimizer_errors=True)
        except Exception as e:  # tf2onnx raises plain ValueError/KeyError/...: give the user the context
            raise ExportError(f"tf2onnx could not convert the model (opset {opset}): "
                              f"{type(e).__name__}: {e}") from e

    if initializers:
        _bind_initializers(model, initializers)
    _raise_for_unconverted_ops(model, describe_node or (lambda name: f"node '{name}'"))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"tf2onnx produced an invalid ONNX model: {e}") from e
    _name_dims(model, dim_names or {})
    return model


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


def _bind_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> None:
    inputs = {value.name: value for value in model.graph.input}
    unknown = sorted(set(arrays) - set(inputs))
    if unknown:
        raise ExportError(f"internal: weights {unknown} are not inputs of the converted graph")
    for name, array in arrays.items():
        model.graph.input.remove(inputs[name])
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name=name))


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


def compare_with_onnxruntime(model: onnx.ModelProto, reference: Callable[[Arrays], Arrays],
                             cases: Sequence[CheckCase], tolerance: float,
                             rel_tolerance: float) -> CheckResult:
    """Run every case through onnxruntime and ``reference``; fail listing every disagreement.

    A case fails when its max abs diff exceeds ``tolerance``, or exceeds ``rel_tolerance`` times the
    output's peak magnitude (catches real errors in models whose outputs are tiny, e.g. an untrained
    CNN whose embeddings are ~1e-11, where any absolute tolerance passes trivially).
    """
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
        raise ExportError(f"onnxruntime cannot load the exported model: {e}") from e
    output_names = [o.name for o in session.get_outputs()]

    per_output: dict[str, float] = dict.fromkeys(output_names, 0.0)
    peak: dict[str, float] = dict.fromkeys(output_names, 0.0)
    problems: list[str] = []
    golden: dict[str, Arrays] = {}
    # The golden samples (golden.npz) are the largest case: the one a changed model can least hide in.
    largest = max(cases, key=lambda c: sum(np.asarray(v).size for v in c.inputs.values()), default=None)
    for case in cases:
        expected = reference(case.inputs)
        if case is largest:
            golden = {"inputs": dict(case.inputs), "outputs": dict(expected)}
        try:
            actual = dict(zip(output_names, session.run(output_names, case.inputs), strict=True))
        except Exception as e:
            raise ExportError(f"onnxruntime failed on {case.label}: {e}") from e
        if set(expected) != set(actual):
            raise ExportError(f"output names differ: source {sorted(expected)}, ONNX {sorted(actual)}")
        for name in output_names:
            problem = _compare_one(name, case.label, expected[name], actual[name], tolerance, rel_tolerance,
                                   per_output, peak)
            if problem:
                problems.append(problem)
    if problems:
        raise ExportError(f"the ONNX model disagrees with the source in {len(problems)} place(s):\n  "
                          + "\n  ".join(problems))
    return CheckResult(max_abs_diff=max(per_output.values(), default=0.0), per_output=per_output,
                       peak_abs=peak, cases=[c.label for c in cases], tolerance=tolerance,
                       rel_tolerance=rel_tolerance, golden_inputs=golden.get("inputs", {}),
                       golden_outputs=golden.get("outputs", {}))


def _compare_one(name: str, label: str, expected: np.ndarray, actual: np.ndarray, tolerance: float,
                 rel_tolerance: float, per_output: dict[str, float], peak: dict[str, float]) -> str | None:
    if expected.shape != actual.shape:
        return f"{name} ({label}): shape {actual.shape} from ONNX, {expected.shape} from the source"
    if expected.dtype != actual.dtype:
        return f"{name} ({label}): dtype {actual.dtype} from ONNX, {expected.dtype} from the source"
    exp64, act64 = expected.astype(np.float64), actual.astype(np.float64)
    if not np.array_equal(np.isnan(exp64), np.isnan(act64)):
        return f"{name} ({label}): NaN in different places"
    if expected.size == 0:
        return None
    diff = float(np.nanmax(np.abs(exp64 - act64)))
    case_peak = float(np.nanmax(np.abs(exp64)))
    per_output[name] = max(per_output[name], diff)
    peak[name] = max(peak[name], case_peak)
    if diff > tolerance:
        return f"{name} ({label}): max abs diff {diff:.3g} > tolerance {tolerance:g}"
    if case_peak > 0 and diff > rel_tolerance * case_peak:
        return (f"{name} ({label}): max abs diff {diff:.3g} > rel_tolerance {rel_tolerance:g} "
                f"x peak |value| {case_peak:.3g}")
    return None


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    try:
        onnx.save(model, str(path))
    except (OSError, ValueError) as e:  # ValueError: a model past protobuf's 2 GB limit
        raise ExportError(f"cannot write {path}: {e}") from e


def tool_versions() -> dict[str, str]:
    """Recorded in export.json: an ONNX file's numbers depend on the converter that wrote it."""
    return {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}
