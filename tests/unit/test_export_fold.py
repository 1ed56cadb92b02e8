"""Folding (toolkit/export/fold.py): a Keras model traced with its weights as inputs must come out
as the graph freezing gives - BatchNorm inside the convolutions, one layout Transpose - and a
folding that breaks the model must never be what gets written."""

from __future__ import annotations

import collections
from pathlib import Path

import keras
import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from toolkit.export import fold
from toolkit.export.keras_models import export_keras_model
from toolkit.export.zoo import informative_weights


def conv_bn_model() -> keras.Model:
    """Conv/BN/ReLU blocks, a depthwise one, global pooling and a head: the shape of MobileNet."""
    x = inputs = keras.Input((32, 32, 3), name="image")
    for i, filters in enumerate((8, 16)):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(6.0, name=f"relu{i}")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn_dw")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="logits")(x))


def smooth_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grid = np.linspace(0, np.pi, 32, dtype=np.float32)
    base = np.sin(grid[None, :, None, None] * rng.uniform(1, 3, (n, 1, 1, 3)))
    return (base * np.cos(grid[None, None, :, None] * rng.uniform(1, 3, (n, 1, 1, 3)))).astype(np.float32)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(3)
    built = conv_bn_model()
    informative_weights(built, smooth_images(16) * 0.9)
    return built


def run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


def rel_diff(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def ops(path: Path) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_weights_traced_as_inputs_fold_into_the_frozen_graph(tmp_path: Path, model: keras.Model) -> None:
    report = export_keras_model(model, tmp_path / "m")

    found = ops(report.model_path)
    assert found["Transpose"] == 1  # the NHWC input only: kernels folded, the layout pushed through
    assert found["Conv"] == 3 and found["GlobalAveragePool"] == 1
    for unfolded in ("BatchNormalization", "Sqrt", "Reciprocal", "Sub", "ReduceMean"):
        assert found[unfolded] == 0, (unfolded, found)
    assert {o.domain for o in onnx.load(str(report.model_path)).opset_import} <= {"", "ai.onnx.ml"}
    x = smooth_images(3, seed=9)
    assert rel_diff(run(report.model_path, x), model(x).numpy()) < 1e-5
    assert not (report.version_dir / "unfolded").exists()


def test_a_folding_that_changes_the_answers_is_not_written(tmp_path: Path, model: keras.Model,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(folded: onnx.ModelProto) -> onnx.ModelProto:  # an optimizer bug: one weight flips sign
        for tensor in folded.graph.initializer:
            if len(tensor.dims) == 4:
                array = -onnx.numpy_helper.to_array(tensor)
                tensor.CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
                break
        return folded

    real = fold._push_transposes

    def push_then_break(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
        optimized, held = real(model)
        return broken(optimized), held

    monkeypatch.setattr(fold, "_push_transposes", push_then_break)
    report = export_keras_model(model, tmp_path / "m")

    found = ops(report.model_path)
    assert found["Sqrt"] > 0  # the unfolded graph was kept, and it passed the check
    x = smooth_images(3, seed=9)
    assert rel_diff(run(report.model_path, x), model(x).numpy()) < 1e-5


def test_an_optimizer_that_fails_leaves_the_file_untouched(tmp_path: Path, model: keras.Model,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(_model: onnx.ModelProto) -> tuple[onnx.ModelProto, list]:
        raise KeyError("a tf2onnx optimizer crashed")

    monkeypatch.setattr(fold, "_push_transposes", crash)
    report = export_keras_model(model, tmp_path / "m")

    assert ops(report.model_path)["Sqrt"] > 0
    assert sorted(p.name for p in report.version_dir.iterdir()) == ["export.json", "golden.npz", "model.onnx"]


def test_a_large_file_is_checked_from_a_mapped_copy_and_a_wrong_one_still_fails(
        tmp_path: Path, model: keras.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files past verify.MAP_BYTES are checked from a copy whose weights onnxruntime maps (memory): the
    same check, the copy gone afterwards, the written file a single one; a wrong weight still fails."""
    from toolkit.errors import ExportError
    from toolkit.export import verify

    monkeypatch.setattr(verify, "MAP_BYTES", 1)
    seen = []
    real = verify._weights_outside

    def spy(path: Path):
        seen.append(path)
        return real(path)

    monkeypatch.setattr(verify, "_weights_outside", spy)
    report = export_keras_model(model, tmp_path / "m")
    assert seen  # the export (which raises on a failed check) was checked from the mapped copy
    assert sorted(p.name for p in report.version_dir.iterdir()) == ["export.json", "golden.npz", "model.onnx"]

    wrong = onnx.load(str(report.model_path))
    for tensor in wrong.graph.initializer:
        if len(tensor.dims) == 4:
            tensor.CopyFrom(onnx.numpy_helper.from_array(-onnx.numpy_helper.to_array(tensor), tensor.name))
            break
    onnx.save(wrong, str(tmp_path / "wrong.onnx"))
    x = smooth_images(3, seed=9)
    case = verify.CheckCase("batch=3", {report.inputs[0].name: x})
    expected = [{report.outputs[0].name: model(x).numpy()}]
    with pytest.raises(ExportError, match="disagrees"):
        verify.check_onnx(tmp_path / "wrong.onnx", [case], expected, None, 1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "wrong.onnx"]
