"""fp16 export: onnxruntime's converter with float32 inputs and outputs, the float16 round trips it
leaves between float32 nodes removed, and the accuracy gate that writes a model or nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import write_linear_onnx

from toolkit.export.half import half_outputs, to_fp16
from toolkit.export.quantize import FP16_GATE, Gate, QuantizationError


def shape_arithmetic_model() -> onnx.ModelProto:
    """tf2onnx's pattern that float16 breaks: a slice end computed in float from a shape and clamped
    with 1e9 (Max, which the converter keeps float32), then cast back to int; the slice takes the
    first rows of a table like BERT's position embeddings."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4) / 7
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], start=1, end=2),        # [sequence]
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT, name="Cast__31"),
        helper.make_node("Concat", ["shape_f", "all_f"], ["ends_f"], axis=0, name="Concat__32"),
        helper.make_node("Max", ["ends_f", "floor"], ["clamped"], name="Max__33"),   # [sequence, 1e9]
        helper.make_node("Cast", ["clamped"], ["ends"], to=TensorProto.INT64, name="Cast__34"),
        helper.make_node("Slice", ["table", "zeros", "ends", "axes"], ["rows"], name="slice"),
        helper.make_node("Add", ["x", "rows"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "shape_arithmetic",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 4])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(np.array([0, 0], np.int64), "zeros"),
                     numpy_helper.from_array(np.array([0, 1], np.int64), "axes"),
                     numpy_helper.from_array(np.array([0], np.float32), "all_f"),
                     numpy_helper.from_array(np.array([-1e9, 1e9], np.float32), "floor")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_fp16_keeps_float32_io_and_the_shape_arithmetic_exact():
    model = shape_arithmetic_model()
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    half = to_fp16(model)
    onnx.checker.check_model(half, full_check=True)  # topologically sorted, types consistent
    assert [i.type.tensor_type.elem_type for i in half.graph.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in half.graph.output] == [TensorProto.FLOAT]
    assert numpy_helper.to_array(next(i for i in half.graph.initializer if i.name == "table")).dtype == np.float16
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and got.shape == expected.shape == (2, 3, 4)
    np.testing.assert_allclose(got, expected, atol=2e-2)


def test_onnxruntimes_converter_alone_breaks_that_arithmetic():
    """Why the round trips are removed: without it the 1e9 clamp becomes infinity in float16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(shape_arithmetic_model(), keep_io_types=True)
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(Exception):  # noqa: B017 (onnxruntime raises its own Fail or InvalidArgument)
        session = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, {"x": x})


def linear_cases() -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(n, 4)).astype(np.float32)} for n in (1, 3, 8)]


def test_half_outputs_writes_a_float16_model_that_passes_the_gate(tmp_path):
    fp32 = write_linear_onnx(tmp_path / "fp32" / "model.onnx")
    report = half_outputs(fp32, tmp_path / "model.onnx", linear_cases())
    assert report.scheme == "fp16" and report.sentences == 12 and report.gate == FP16_GATE
    assert report.min_cosine >= FP16_GATE.min_cosine and report.rank_agreement >= FP16_GATE.min_rank
    weights = onnx.load(str(tmp_path / "model.onnx")).graph.initializer
    assert {numpy_helper.to_array(w).dtype for w in weights} == {np.dtype(np.float16)}
    recorded = report.to_dict()
    assert recorded["output_rows"] == 12 and recorded["fp16_mb"] > 0 and "float16" in recorded["method"]
    assert "fp16 vs fp32" in report.summary_line()
    peak = recorded["largest_float16_activation"]
    assert peak["float16_max"] == 65504 and 0 < peak["abs"] < 100 and peak["tensor"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "model.onnx"]  # no scratch left


def test_a_model_missing_the_fp16_gate_is_not_written(tmp_path):
    fp32 = write_linear_onnx(tmp_path / "fp32" / "model.onnx")
    with pytest.raises(QuantizationError) as caught:
        half_outputs(fp32, tmp_path / "model.onnx", linear_cases(), gate=Gate(min_cosine=1.0, min_mean_cosine=1.0))
    assert "the fp16 model missed the accuracy gate over 12 output rows" in str(caught.value)
    assert "nothing was written" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32"]


def test_nodes_near_float16s_range_stay_float32(tmp_path):
    """Values past float16's 65504 become infinity on a GPU, while onnxruntime's CPU provider computes
    in float32 and would not notice: the fp32 model's activations decide what stays float32."""
    fp32 = write_linear_onnx(tmp_path / "fp32" / "model.onnx")
    huge = [{"x": np.full((2, 4), 1e6, np.float32)}]
    report = half_outputs(fp32, tmp_path / "model.onnx", huge)
    assert report.extra["kept_float32"]["nodes"] == 2  # x @ W reaches 1.6e6, + b too
    model = onnx.load(str(tmp_path / "model.onnx"))
    to_half = [n.name for n in model.graph.node
               if n.op_type == "Cast" and any(a.name == "to" and a.i == TensorProto.FLOAT16 for a in n.attribute)]
    assert to_half == [] and {n.op_type for n in model.graph.node} <= {"MatMul", "Add", "Cast"}
    assert np.isfinite(ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, huge[0])[0]).all()
    modest = half_outputs(fp32, tmp_path / "small.onnx", linear_cases())
    assert modest.extra["kept_float32"]["nodes"] == 0
    assert modest.extra["largest_float16_activation"]["abs"] < 65504 / 4


def test_keras_fp16_export_records_the_gate_and_keeps_float32_io(tmp_path):
    import keras

    from toolkit.export.keras_models import export_keras_model

    keras.utils.set_random_seed(0)
    features = keras.Input(shape=(6,), name="features")
    hidden = keras.layers.Dense(16, activation="relu")(features)
    model = keras.Model(features, keras.layers.Dense(4, name="scores")(hidden))
    report = export_keras_model(model, tmp_path / "out", fp16=True)
    recorded = json.loads(report.metadata_path.read_text())["quantization"]
    assert recorded["scheme"] == "fp16" and recorded["min_cosine"] >= FP16_GATE.min_cosine
    assert report.quantization and "fp16 vs fp32" in report.quantization
    assert sorted(p.name for p in report.version_dir.iterdir()) == ["export.json", "golden.npz", "model.onnx"]
    session = ort.InferenceSession(str(report.model_path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).normal(size=(3, 6)).astype(np.float32)
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, model(x).numpy(), atol=2e-2, rtol=1e-2)
    initializers = onnx.load(str(report.model_path)).graph.initializer
    assert any(numpy_helper.to_array(w).dtype == np.float16 for w in initializers)


def test_cli_refuses_int8_with_fp16_and_a_gate_without_either(tmp_path):
    from click.testing import CliRunner

    from toolkit.cli.main import cli

    runner = CliRunner()
    both = runner.invoke(cli, ["export", "bert", "--fp16", "--quantize", "int8", "--out", str(tmp_path / "b")])
    assert both.exit_code == 1 and "--quantize int8 and --fp16 exclude each other" in both.output
    alone = runner.invoke(cli, ["export", "keras", "MobileNetV2", "--min-cosine", "0.9", "--out", str(tmp_path / "k")])
    assert alone.exit_code == 1 and "gate --quantize int8 or --fp16" in alone.output
    assert not Path(tmp_path / "b").exists() and not Path(tmp_path / "k").exists()


def test_cli_keras_fp16_writes_the_gate_line_and_the_command_into_model_yaml(tmp_path):
    import keras
    from click.testing import CliRunner

    from toolkit.cli.main import cli
    from toolkit.repository.project import load_model

    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    keras.Model(x, keras.layers.Dense(3, name="y")(x)).save(tmp_path / "m.keras")
    out = tmp_path / "models" / "small"
    result = CliRunner().invoke(cli, ["export", "keras", str(tmp_path / "m.keras"), "--out", str(out), "--fp16",
                                      "--min-cosine", "0.9995", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "fp16 vs fp32   : over 4 output rows min cosine" in result.output and "(>= 0.9995)" in result.output
    assert load_model(out).spec.export == f"toolkit export keras {tmp_path / 'm.keras'} --fp16 --min-cosine 0.9995"
    assert json.loads((out / "1" / "export.json").read_text())["quantization"]["gate"]["min_cosine"] == 0.9995
