"""The export converts what Keras 3 models hold, checks the file the way Triton serves it, and says
when its check could not tell a right model from a wrong one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

from toolkit.errors import ExportError
from toolkit.export import onnx_check
from toolkit.export.keras_models import export_keras_model
from toolkit.lifecycle.golden import GOLDEN_FILE
from toolkit.runtime.onnx_hook import session as served_session


def served(version_dir: Path, feeds: dict[str, np.ndarray], plain: bool = False) -> dict[str, np.ndarray]:
    """The ONNX hook's session (what Triton runs); ``plain`` ignores what the export recorded."""
    export = json.loads((version_dir / "export.json").read_text())
    sess = served_session(ort, version_dir / "model.onnx", 0, "false", None if plain else export.get("onnxruntime"))
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def images(n: int, size: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, (n, size, size, 3)) * rng.uniform(0.3, 1, (n, 1, 1, 1))).astype(np.float32)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_normalization_constants_become_initializers_not_inputs(tmp_path: Path) -> None:
    # Keras 3 keeps a Normalization layer's mean and variance as eager constants; tf2onnx's
    # from_function made them graph inputs nobody could feed (every EfficientNet has one).
    keras.utils.set_random_seed(0)
    x = keras.Input((5,), name="x")
    h = keras.layers.Normalization(mean=[1, 2, 3, 4, 5], variance=[1, 4, 9, 16, 25], name="norm")(x)
    y = keras.layers.Dense(3, name="y")(h)
    model = keras.Model(x, y)

    report = export_keras_model(model, tmp_path / "m")

    graph = onnx.load(str(report.model_path)).graph
    assert [i.name for i in graph.input] == ["x"]
    feed = np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32) * 5
    assert rel(served(report.version_dir, {"x": feed})["y"], model(feed).numpy()) < 1e-5


def test_grouped_convolution_and_exact_gelu_convert(tmp_path: Path) -> None:
    # ConvNeXt: Conv2D(groups=C) (an XLA call in Keras' TF backend) and the exact GELU (Erfc).
    keras.utils.set_random_seed(0)
    x = keras.Input((12, 12, 8), name="image")
    h = keras.layers.Conv2D(8, 3, groups=8, padding="same", name="depthwise")(x)
    h = keras.layers.Conv2D(16, 1, groups=2, name="grouped")(h)
    h = keras.layers.Activation(lambda t: keras.activations.gelu(t, approximate=False), name="gelu")(h)
    y = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(x, y)

    report = export_keras_model(model, tmp_path / "m")

    ops = {n.op_type for n in onnx.load(str(report.model_path)).graph.node}
    assert "Erf" in ops and "Conv" in ops
    feed = np.random.default_rng(2).normal(size=(2, 12, 12, 8)).astype(np.float32)
    assert rel(served(report.version_dir, {"image": feed})["pool"], model(feed).numpy()) < 1e-5


def pad_pool_model() -> keras.Model:
    """The ResNetV2 stem's shape: a convolution, zero padding, then max pooling. onnxruntime 1.31.1's
    Pad_Fusion folds the zero Pad into the pool (which pads with -inf): wrong wherever values are < 0."""
    keras.utils.set_random_seed(3)
    x = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(8, 3, name="conv")(x)
    h = keras.layers.ZeroPadding2D(1, name="pad")(h)
    h = keras.layers.MaxPooling2D(3, strides=2, name="pool")(h)
    return keras.Model(x, keras.layers.GlobalAveragePooling2D(name="features")(h))


def test_an_optimizer_bug_is_found_recorded_and_served_around(tmp_path: Path) -> None:
    model = pad_pool_model()

    report = export_keras_model(model, tmp_path / "m")

    serving = json.loads(report.metadata_path.read_text())["onnxruntime"]
    assert serving["disabled_optimizers"] == ["Pad_Fusion"]
    assert serving["triton_graph_level"] == 2  # Pad_Fusion is a basic rewrite: the container turns all off
    assert "optimizer_bug" in serving and any("Pad_Fusion" in line for line in report.summary_lines())
    feed = images(3, 16)
    want = model(feed).numpy()
    assert rel(served(report.version_dir, {"image": feed})["features"], want) < 1e-5
    # without what the export recorded, the served path would be wrong: the test can fail
    assert rel(served(report.version_dir, {"image": feed}, plain=True)["features"], want) > 1e-3


def test_container_config_lowers_the_graph_level_the_export_recorded(tmp_path: Path) -> None:
    from toolkit.repository.project import load_model
    from toolkit.repository.render import model_config

    export_keras_model(pad_pool_model(), tmp_path / "pp")
    (tmp_path / "pp" / "model.yaml").write_text("kind: onnx\nmax_batch_size: 4\n")

    config = model_config(load_model(tmp_path / "pp"), "container")

    assert config["optimization"] == {"graph": {"level": 2}}
    assert "optimization" not in model_config(load_model(tmp_path / "pp"), "embedded")


def test_an_untrained_head_is_reported_a_layer_before_it_is_checked_and_no_golden_is_written(
        tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    features = keras.layers.Dense(8, activation="tanh", name="features")(x)
    head = keras.layers.Dense(4, kernel_initializer="zeros", bias_initializer="ones", name="head")(features)
    model = keras.Model(x, head)  # the head answers 1 for everything, whatever the input

    report = export_keras_model(model, tmp_path / "m")

    assert report.check.blind_outputs == ["head"]
    assert report.check.probes == {"probe.features": "layer 'features' (Dense)"}
    assert report.check.discriminating["probe.features"] is True
    assert not (report.version_dir / GOLDEN_FILE).exists()
    assert [o.name for o in onnx.load(str(report.model_path)).graph.output] == ["head"]  # the probe is stripped
    assert [t.name for t in report.outputs] == ["head"]
    assert any("NOT DISCRIMINATING" in line for line in report.summary_lines())
    meta = json.loads(report.metadata_path.read_text())
    assert meta["discriminating"]["head"] is False


def test_a_discriminating_model_records_golden_and_the_tolerance_is_relative(tmp_path: Path) -> None:
    from toolkit.export.verify import CheckCase, check_onnx

    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    model = keras.Model(x, keras.layers.Dense(4, name="logits")(x))
    report = export_keras_model(model, tmp_path / "m")
    assert (report.version_dir / GOLDEN_FILE).exists()
    assert report.check.discriminating == {"logits": True} and report.check.tolerance is None

    # logits of ~1e5: an error of 5e-5 of the peak is rounding (passes), 2e-4 of it is not
    cases = [CheckCase("batch=3", {"x": np.random.default_rng(4).normal(size=(3, 6)).astype(np.float32)})]
    truth = served(report.version_dir, cases[0].inputs)["logits"]
    scale = 1e5 / np.abs(truth).max()
    big = onnx.load(str(report.model_path))
    for initializer in big.graph.initializer:
        array = onnx.numpy_helper.to_array(initializer) * np.float32(scale)
        initializer.CopyFrom(onnx.numpy_helper.from_array(array.astype(np.float32), initializer.name))
    truth = truth * scale
    check = check_onnx(big, cases, [{"logits": (truth * (1 + 5e-5)).astype(np.float32)}], None, 1e-4)
    assert check.max_abs_diff > 1  # far past any absolute 1e-4
    with pytest.raises(ExportError, match=r"rel_tolerance 0\.0001"):
        check_onnx(big, cases, [{"logits": (truth * (1 + 2e-4)).astype(np.float32)}], None, 1e-4)
    with pytest.raises(ExportError, match=r"> tolerance 0\.001"):
        check_onnx(big, cases, [{"logits": (truth * (1 + 5e-5)).astype(np.float32)}], 1e-3, 1e-4)


def test_save_onnx_streams_the_same_model_and_uses_external_data_past_the_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keras.utils.set_random_seed(0)
    x = keras.Input((64,), name="x")
    model = keras.Model(x, keras.layers.Dense(64, name="y")(keras.layers.Dense(64, name="h")(x)))
    report = export_keras_model(model, tmp_path / "m")
    proto = onnx.load(str(report.model_path))

    onnx_check.save_onnx(proto, tmp_path / "again.onnx")
    assert onnx.load(str(tmp_path / "again.onnx")) == proto

    monkeypatch.setattr(onnx_check, "_PROTOBUF_LIMIT", 1024)
    (tmp_path / "big").mkdir()
    files = onnx_check.save_onnx(proto, tmp_path / "big" / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert files[0].stat().st_size < 4096 < files[1].stat().st_size
    feed = np.ones((2, 64), np.float32)
    sess = ort.InferenceSession(str(tmp_path / "big" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": feed})[0], model(feed).numpy(), rtol=1e-5, atol=1e-6)


def test_export_writes_model_yaml_and_refuses_a_new_version_with_other_tensors(tmp_path: Path) -> None:
    from toolkit.repository.project import load_model

    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    model = keras.Model(x, keras.layers.Dense(3, name="y")(x))
    report = export_keras_model(model, tmp_path / "m", export_command="toolkit export keras m.keras")
    assert report.model_yaml == tmp_path / "m" / "model.yaml"
    spec = load_model(tmp_path / "m").spec
    assert (spec.kind, spec.max_batch_size, spec.export) == ("onnx", 16, "toolkit export keras m.keras")
    assert spec.dynamic_batching is not None

    other = keras.Model(x, keras.layers.Dense(3, name="scores")(x))
    with pytest.raises(ExportError, match="'y' but the new ONNX has 'scores'"):
        export_keras_model(other, tmp_path / "m", version=2, export_command="toolkit export keras m.keras")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "model.yaml"]


@pytest.mark.slow
def test_cli_failure_is_one_error_line_naming_the_layer_and_the_log(tmp_path: Path) -> None:
    @keras.saving.register_keras_serializable(package="toolkit_check_tests")
    class Digamma(keras.layers.Layer):
        def call(self, t):
            return tf.math.digamma(t)

    x = keras.Input((4,), name="x")
    keras.Model(x, Digamma(name="digamma")(x)).save(tmp_path / "bad.keras")
    module = tmp_path / "bad_layers.py"
    module.write_text("import keras, tensorflow as tf\n\n"
                      "@keras.saving.register_keras_serializable(package='toolkit_check_tests')\n"
                      "class Digamma(keras.layers.Layer):\n    def call(self, t):\n        return tf.math.digamma(t)\n")

    result = subprocess.run(
        [str(Path(sys.executable).parent / "toolkit"), "export", "keras", str(tmp_path / "bad.keras"),
         "--custom-module", "bad_layers", "--out", str(tmp_path / "out"), "--quiet"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "0"})

    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines  # no TensorFlow, absl or tf2onnx line before it
    assert lines[0].startswith("Error: ") and "Digamma" in lines[0] and "'digamma'" in lines[0]
    log = lines[0].rsplit("output: ", 1)[1].rstrip(")")
    assert Path(log).is_file()
    assert not (tmp_path / "out" / "1").exists()


class Doubler(keras.Model):
    """A subclassed model: no symbolic input, only the shape it was first called with."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x) * 2.0


def test_subclassed_and_recurrent_models_export_with_their_weights_as_inputs(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    doubler = Doubler()
    doubler(np.zeros((1, 4), np.float32))
    report = export_keras_model(doubler, tmp_path / "sub")
    assert [(t.name, t.shape) for t in report.inputs] == [("x", (-1, 4))]
    feed = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)
    assert rel(served(report.version_dir, {"x": feed})["output_0"], doubler(feed).numpy()) < 1e-6

    ids = keras.Input((None,), dtype="int64", name="ids")
    h = keras.layers.Embedding(50, 8, mask_zero=True)(ids)
    h = keras.layers.Bidirectional(keras.layers.LSTM(4), name="bilstm")(h)
    model = keras.Model(ids, keras.layers.Dense(2, name="out")(h))
    report = export_keras_model(model, tmp_path / "rnn")
    tokens = np.array([[3, 9, 4, 0, 0], [7, 1, 2, 8, 5]], np.int64)  # the first row padded (mask_zero)
    assert rel(served(report.version_dir, {"ids": tokens})["out"], model(tokens).numpy()) < 1e-5
    names = {i.name for i in onnx.load(str(report.model_path)).graph.initializer}
    assert any(n.startswith("bilstm/") for n in names)  # weights keep their Keras paths

    unbuilt = Doubler()
    with pytest.raises(ExportError, match="call it once on an example batch"):
        export_keras_model(unbuilt, tmp_path / "unbuilt")


def test_cli_writes_the_command_it_ran_into_model_yaml(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from toolkit.cli.main import cli
    from toolkit.repository.project import load_model

    keras.utils.set_random_seed(0)
    x = keras.Input((6,), name="x")
    keras.Model(x, keras.layers.Dense(3, name="y")(x)).save(tmp_path / "m.keras")
    out = tmp_path / "models" / "ranker"

    result = CliRunner().invoke(cli, ["export", "keras", str(tmp_path / "m.keras"), "--out", str(out),
                                      "--input-range", "0", "255", "--alias", "y=scores", "--quiet"])

    assert result.exit_code == 0, result.output
    assert f"model.yaml     : wrote {out / 'model.yaml'}" in result.output
    spec = load_model(out).spec
    assert spec.export == f"toolkit export keras {tmp_path / 'm.keras'} --alias y=scores --input-range 0 255"
    assert [t.name for t in spec.outputs] == ["scores"]
