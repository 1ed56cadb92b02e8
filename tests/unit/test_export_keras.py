"""``toolkit export keras``: a built-in application, tiny files written here, aliases, errors."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
from click.testing import CliRunner

from toolkit.cli.export import export as export_cli
from toolkit.errors import ExportError
from toolkit.export.keras_models import export_keras, export_keras_model, resolve_aliases
from toolkit.export.onnx_check import CheckCase, compare_with_onnxruntime
from toolkit.export.staging import staged_version_dir


@keras.saving.register_keras_serializable(package="toolkit_tests")
class ScaleShift(keras.layers.Layer):
    """A custom layer ONNX can express (Mul, Add)."""

    def __init__(self, scale: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def call(self, x):
        return x * self.scale + 1.0

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="toolkit_tests")
class LogGamma(keras.layers.Layer):
    """A custom layer whose TF op (Lgamma) tf2onnx has no ONNX mapping for."""

    def call(self, x):
        return tf.math.lgamma(x)


def tiny_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    features = keras.Input(shape=(6,), name="features")
    x = keras.layers.Dense(8, activation="relu", name="hidden")(features)
    x = ScaleShift(3.0, name="scale_shift")(x)
    scores = keras.layers.Dense(3, activation="softmax", name="scores")(x)
    return keras.Model(features, scores, name="tiny")


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.slow
def test_cli_export_keras_writes_image_embedding_model_when_mobilenetv2_is_aliased(tmp_path: Path) -> None:
    result = CliRunner().invoke(export_cli, [
        "keras", "MobileNetV2", "--no-include-top", "--pooling", "avg", "--input-size", "224",
        "--input-name", "image", "--output-name", "embedding", "--out", str(tmp_path / "mnv2"), "--quiet"])

    assert result.exit_code == 0, result.output
    assert "input          : image FLOAT [batch, 224, 224, 3]" in result.output
    assert "output         : embedding FLOAT [batch, 1280]" in result.output
    model = onnx.load(str(tmp_path / "mnv2" / "1" / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["embedding"]
    meta = json.loads((tmp_path / "mnv2" / "1" / "export.json").read_text())
    (old_input, new_input), (old_output, new_output) = meta["aliases"].items()  # Keras numbers layer names
    assert old_input.startswith("input_layer") and old_output.startswith("global_average_pooling2d")
    assert (new_input, new_output) == ("image", "embedding")
    assert (meta["application"], meta["include_top"], meta["pooling"], meta["weights"]) == \
        ("MobileNetV2", False, "avg", None)
    # weights=None: untrained outputs are tiny, so the relative check is the one that bites
    assert meta["peak_abs_per_output"]["embedding"] > 0
    assert meta["max_abs_diff"] <= 1e-3 * meta["peak_abs_per_output"]["embedding"]
    image = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    embedding = run_onnx(tmp_path / "mnv2" / "1" / "model.onnx", {"image": image})["embedding"]
    assert embedding.shape == (2, 1280) and embedding.dtype == np.float32 and np.isfinite(embedding).all()


@pytest.mark.slow
def test_export_keras_loads_weights_file_when_application_gets_weights(tmp_path: Path) -> None:
    keras.utils.set_random_seed(1)
    trained = keras.applications.MobileNetV2(include_top=False, pooling="avg", weights=None,
                                             input_shape=(96, 96, 3))
    rng = np.random.default_rng(0)
    for layer in trained.layers:  # outputs of an untrained net are ~1e-11: give it BN statistics of its own
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.gamma.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, shape).astype(np.float32))
    weights = tmp_path / "mnv2.weights.h5"
    trained.save_weights(weights)

    report = export_keras("MobileNetV2", tmp_path / "out", include_top=False, pooling="avg", input_size=96,
                          weights=weights, input_name="image", output_name="embedding")

    assert report.metadata["weights"] == str(weights)
    image = np.random.default_rng(2).uniform(-1, 1, (2, 96, 96, 3)).astype(np.float32)
    onnx_embedding = run_onnx(report.model_path, {"image": image})["embedding"]
    keras_embedding = trained(image, training=False).numpy()
    assert np.abs(keras_embedding).max() > 1e-2
    assert np.abs(onnx_embedding - keras_embedding).max() < 1e-5


def test_export_keras_refuses_when_weights_file_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"weights file .* does not exist"):
        export_keras("MobileNetV2", tmp_path / "out", weights=tmp_path / "imagenet.h5")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_export_keras_matches_keras_when_tiny_file_has_custom_layer(tmp_path: Path, suffix: str) -> None:
    model = tiny_model()
    path = tmp_path / f"tiny{suffix}"
    model.save(path)

    report = export_keras(path, tmp_path / "out", version=2, aliases={"features": "x", "scores": "probs"})

    assert [(t.name, t.dtype, t.shape) for t in report.inputs] == [("x", "FLOAT", (-1, 6))]
    assert [(t.name, t.dtype, t.shape) for t in report.outputs] == [("probs", "FLOAT", (-1, 3))]
    assert report.max_abs_diff < 1e-5 and report.check.cases[0].startswith("batch=1")
    features = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
    probs = run_onnx(tmp_path / "out" / "2" / "model.onnx", {"x": features})["probs"]
    np.testing.assert_allclose(probs, model(features).numpy(), atol=1e-6)
    assert np.abs(probs.sum(axis=1) - 1).max() < 1e-5


def test_export_keras_keeps_dict_names_when_model_has_two_inputs_and_outputs(tmp_path: Path) -> None:
    a, b = keras.Input((4,), name="a"), keras.Input((2,), name="b", dtype="int32")
    joined = keras.layers.Concatenate()([a, keras.ops.cast(b, "float32")])
    model = keras.Model({"a": a, "b": b}, {"sum": keras.ops.sum(joined, axis=1), "joined": joined})

    report = export_keras_model(model, tmp_path / "out", aliases={"b": "codes"})

    assert [(t.name, t.dtype) for t in report.inputs] == [("a", "FLOAT"), ("codes", "INT32")]
    assert sorted(t.name for t in report.outputs) == ["joined", "sum"]
    out = run_onnx(report.model_path, {"a": np.ones((2, 4), np.float32), "codes": np.full((2, 2), 3, np.int32)})
    np.testing.assert_allclose(out["sum"], [10.0, 10.0])


def test_export_keras_names_layer_and_op_when_layer_has_no_onnx_equivalent(tmp_path: Path) -> None:
    features = keras.Input(shape=(4,), name="features")
    model = keras.Model(features, LogGamma(name="log_gamma")(keras.layers.Dense(4)(features)))
    path = tmp_path / "lgamma.keras"
    model.save(path)

    with pytest.raises(ExportError) as error:
        export_keras(path, tmp_path / "out")

    assert "TensorFlow op Lgamma in layer 'log_gamma' (LogGamma" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_export_keras_names_custom_class_when_keras_file_uses_unregistered_layer(tmp_path: Path) -> None:
    path = tmp_path / "tiny.keras"
    tiny_model().save(path)
    registered = keras.saving.get_custom_objects().pop("toolkit_tests>ScaleShift")  # as if never imported
    try:
        with pytest.raises(ExportError, match=r"custom class 'ScaleShift'.*--custom-module"):
            export_keras(path, tmp_path / "out")
    finally:
        keras.saving.get_custom_objects()["toolkit_tests>ScaleShift"] = registered


@pytest.mark.parametrize(("source", "message"), [
    ("missing/model.keras", "does not exist"),
    ("MobileNetV9", "did you mean MobileNetV2"),
    ("notes.txt", "unsupported file type '.txt'"),
])
def test_export_keras_fails_clearly_when_source_is_wrong(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          source: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not a model")

    with pytest.raises(ExportError, match=message):
        export_keras(source, tmp_path / "out")


def test_export_keras_converts_saved_model_when_given_its_folder(tmp_path: Path) -> None:
    model = tiny_model(seed=4)
    model.export(str(tmp_path / "saved"), format="tf_saved_model", verbose=False)

    report = export_keras(tmp_path / "saved", tmp_path / "out", output_name="probs", input_name="features")

    features = np.random.default_rng(5).normal(size=(3, 6)).astype(np.float32)
    probs = run_onnx(report.model_path, {"features": features})["probs"]
    np.testing.assert_allclose(probs, model(features).numpy(), atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_name": "image"}, "--input-name needs a model with one input, this one has 2"),
    ({"aliases": {"nope": "x"}}, "has no input or output 'nope'"),
    ({"aliases": {"a": "out"}}, "two tensors would both be named out"),
    ({"aliases": {"a": "1bad name"}}, "invalid tensor name"),
])
def test_resolve_aliases_rejects_when_alias_cannot_apply(kwargs: dict, message: str) -> None:
    with pytest.raises(ExportError, match=message):
        resolve_aliases(["a", "b"], ["out"], **kwargs)


def test_compare_with_onnxruntime_lists_every_output_when_source_disagrees(tmp_path: Path) -> None:
    model = tiny_model()
    report = export_keras_model(model, tmp_path / "out")
    onnx_model = onnx.load(str(report.model_path))
    name = report.outputs[0].name
    cases = [CheckCase(f"case{i}", {report.inputs[0].name: np.ones((i + 1, 6), np.float32)}) for i in range(2)]

    def off_by_a_bit(inputs):
        return {name: model(inputs[report.inputs[0].name]).numpy() + 1e-3}

    with pytest.raises(ExportError) as error:
        compare_with_onnxruntime(onnx_model, off_by_a_bit, cases, tolerance=1e-4, rel_tolerance=1.0)
    assert "2 place(s)" in str(error.value) and f"{name} (case1): max abs diff 0.001" in str(error.value)

    def tiny_relative_error(inputs):  # abs diff far below tolerance, 1% of the values: still wrong
        return {name: model(inputs[report.inputs[0].name]).numpy() * 1.01}

    with pytest.raises(ExportError, match="rel_tolerance"):
        compare_with_onnxruntime(onnx_model, tiny_relative_error, cases, tolerance=1.0, rel_tolerance=1e-3)


def test_staged_version_dir_keeps_old_version_when_export_fails(tmp_path: Path) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_text("old")

    with pytest.raises(RuntimeError), staged_version_dir(tmp_path / "m", 1, overwrite=True) as staging:
        (staging / "model.onnx").write_text("half")
        raise RuntimeError("conversion died")

    assert (tmp_path / "m" / "1" / "model.onnx").read_text() == "old"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]

    with staged_version_dir(tmp_path / "m", 1, overwrite=True) as staging:
        (staging / "model.onnx").write_text("new")
    assert (tmp_path / "m" / "1" / "model.onnx").read_text() == "new"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_toolkit_cli_prints_error_without_traceback_when_export_source_is_wrong(tmp_path: Path) -> None:
    from toolkit.cli.main import cli

    result = CliRunner().invoke(cli, ["export", "keras", str(tmp_path / "missing.keras"), "--quiet"])

    assert result.exit_code == 1
    assert "Error: Keras model " in result.output and "does not exist" in result.output
    assert "Traceback" not in result.output


def test_cli_application_list_equals_keras_applications_so_typos_fail_before_tensorflow():
    from toolkit.export.defaults import KERAS_APPLICATIONS
    from toolkit.export.keras_models import keras_applications

    assert list(KERAS_APPLICATIONS) == keras_applications()
