"""Tiny ONNX graphs the tests build themselves (no downloads, no TensorFlow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: y = x @ LINEAR_W + LINEAR_B for the `linear` test model.
LINEAR_W = np.arange(8, dtype=np.float32).reshape(4, 2) / 10
LINEAR_B = np.array([0.5, -1.0], dtype=np.float32)


def write_linear_onnx(path: Path) -> Path:
    """x FP32 [batch, 4] -> y FP32 [batch, 2], with a dynamic batch axis."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(LINEAR_W, "W"), numpy_helper.from_array(LINEAR_B, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_scalar_onnx(path: Path) -> Path:
    """Per-row scalars: x FP32 [batch, 4] and offset FP32 [batch] -> score FP32 [batch]
    (sum(x, axis 1) + offset) and doubled FP32 [batch, 4] (x * 2)."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["sum"], keepdims=0),
         helper.make_node("Add", ["sum", "offset"], ["score"]),
         helper.make_node("Mul", ["x", "two"], ["doubled"])],
        "scalar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("offset", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", 4])],
        initializer=[numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
                     numpy_helper.from_array(np.array(2, dtype=np.float32), "two")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
