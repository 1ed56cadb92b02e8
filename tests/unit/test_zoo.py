"""toolkit/export/zoo.py without exporting: informative weights, check images, the child's peak RSS,
the results table and its section of the README."""

from __future__ import annotations

import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from toolkit.export import zoo


def test_smooth_images_are_in_range_and_differ_from_each_other():
    images = zoo.smooth_images(4, 48, seed=3, value_range=(-1.0, 1.0))
    assert images.shape == (4, 48, 48, 3) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.max() - images.min() > 0.5  # uses the range, not a sliver of it
    shuffled = np.random.default_rng(0).permutation(images.reshape(-1, 3)).reshape(images.shape)
    assert np.abs(np.diff(images, axis=1)).mean() < 0.2 * np.abs(np.diff(shuffled, axis=1)).mean()  # smooth
    assert np.all(np.abs(images[1:] - images[:1]).mean(axis=(1, 2, 3)) > 0.05)  # every image its own
    np.testing.assert_array_equal(images, zoo.smooth_images(4, 48, seed=3, value_range=(-1.0, 1.0)))


def test_input_range_follows_each_familys_preprocessing():
    assert zoo.input_range("EfficientNetB0") == zoo.input_range("ConvNeXtTiny") == (0.0, 255.0)
    assert zoo.input_range("MobileNetV3Small") == (0.0, 255.0)
    assert zoo.input_range("ResNet50V2") == zoo.input_range("MobileNetV2") == (-1.0, 1.0)
    assert zoo.input_range("ResNet50") == zoo.input_range("VGG16") == zoo.CAFFE_MODE
    assert zoo.input_range("DenseNet121") == zoo.TORCH_MODE


def test_informative_weights_reach_a_frozen_nested_model_and_restore_its_settings():
    keras.utils.set_random_seed(0)
    inner_in = keras.Input((8, 8, 3))
    x = keras.layers.Normalization(axis=-1)(inner_in)
    x = keras.layers.Conv2D(6, 3, padding="same")(x)
    x = keras.layers.BatchNormalization(momentum=0.99)(x)
    x = keras.layers.Dropout(0.5)(x)
    inner = keras.Model(inner_in, keras.layers.GlobalAveragePooling2D()(x), name="inner")
    inner.trainable = False
    outer_in = keras.Input((8, 8, 3))
    model = keras.Model(outer_in, keras.layers.Dense(4)(inner(outer_in)))
    images = zoo.smooth_images(8, 8, seed=1, value_range=(0.0, 255.0))

    before = np.asarray(model(images, training=False))
    counts = zoo.informative_weights(model, images)

    assert counts == {"batch_normalization": 1, "normalization": 1, "layer_scale": 0, "dropout": 1}
    norm, conv, bn = (inner.layers[i] for i in (1, 2, 3))
    np.testing.assert_allclose(norm.adapt_mean.numpy(), images.mean(axis=(0, 1, 2)), rtol=1e-4)
    conv_out = conv(norm(images)).numpy()  # what the BN layer saw (dropout was off)
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv_out.mean(axis=(0, 1, 2)), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), conv_out.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-5)
    assert bn.momentum == 0.99 and not bn.trainable and not inner.trainable
    assert inner.layers[4].rate == 0.5 and "call" not in vars(norm)
    after = np.asarray(model(images, training=False))
    assert zoo.spread([after]) > 0.1 and not np.allclose(before, after)


def test_informative_weights_make_mobilenet_answer_differently_per_image():
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNet(weights=None, input_shape=(32, 32, 3))
    images = zoo.smooth_images(4, 32, seed=7, value_range=(-1.0, 1.0))
    before = np.asarray(model(images, training=False))
    np.testing.assert_allclose(before, 1 / 1000, rtol=1e-4)  # blind to its input: any export "matches"
    zoo.informative_weights(model, zoo.smooth_images(32, 32, seed=1, value_range=(-1.0, 1.0)))
    after = np.asarray(model(images, training=False))
    assert after.max() > 3 / 1000 and zoo.spread([after]) > 0.3
    tf.keras.backend.clear_session()


def test_max_rel_diff_and_spread():
    ref = [np.array([[1.0, -2.0], [0.5, 1.0]])]
    assert zoo.max_rel_diff(ref, [ref[0] + [[0.0, 0.02], [0.0, 0.0]]]) == pytest.approx(0.01)
    assert zoo.max_rel_diff(ref, [np.zeros((1, 2))]) == float("inf")
    assert zoo.spread(ref) == pytest.approx(1.5)
    assert zoo.spread([np.ones((3, 4))]) == 0.0


CHILDREN = """
import sys
from pathlib import Path
from toolkit.export.zoo import run_measured
tmp = Path(sys.argv[1])
for code in ("pass", "import numpy; a = numpy.ones(60_000_000)"):  # the second touches 480 MB
    print(run_measured([sys.executable, "-c", code], timeout=60, stdout=tmp / "o", stderr=tmp / "e")["peak_rss_gb"])
"""


def test_run_measured_reports_a_childs_own_peak_rss_when_its_parent_is_small(tmp_path):
    import subprocess

    # From a small parent (as zoo.run_one's, which never imports TensorFlow) the numbers are the
    # children's own; from this test process (TensorFlow loaded) both would start at its RSS.
    done = subprocess.run([sys.executable, "-c", CHILDREN, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, check=True)
    small, big = (float(v) for v in done.stdout.split())
    assert small < 0.2 and 0.45 < big < 0.7, (small, big)
    slow = zoo.run_measured([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5,
                            stdout=tmp_path / "o", stderr=tmp_path / "e")
    assert slow["timed_out"] and slow["exit_code"] is None and slow["seconds"] < 10


def test_table_rewrites_only_its_section(tmp_path):
    entries = [
        {"name": "ResNet50V2", "config": "default", "input_size": 224, "exported": True, "rel_diff": 4.7e-6,
         "rel_diff_unoptimized": 5e-6, "spread": 0.5, "export_seconds": 21.0, "peak_rss_gb": 1.3,
         "weights_mb": 102.5, "date": "2026-12-06"},
        {"name": "ResNet50V2", "config": "no-top avg", "input_size": 224, "exported": True, "rel_diff": 0.06,
         "rel_diff_unoptimized": 8e-6, "spread": 0.9, "export_seconds": 18.0, "peak_rss_gb": 1.2,
         "weights_mb": 94.3, "date": "2026-12-06"},
        {"name": "ConvNeXtTiny", "config": "default", "input_size": 224, "exported": False,
         "error": "Error: TensorFlow op Erfc in layer 'gelu'", "export_seconds": 30.0, "peak_rss_gb": 2.0,
         "weights_mb": 114.0, "date": "2026-12-06"},
    ]
    data = {"meta": {"baseline_rss_gb": 0.6, "machine": {"nproc": 2, "cpu": "AMD EPYC"}}, "results": entries}
    table = zoo.render_table(data, 224)
    assert "**1 of 2 tried (of 40) export with default options, 1 of 1 tried (of 40)" in table
    assert "| ConvNeXtTiny | 114.0 | no [1] | not run |" in table
    assert "yes / **6.0e-02** [2]" in table and "8.0e-06 with onnxruntime's optimizations off" in table
    assert "1.3 (6.8x)" in table and "0.60 GB" in table and "2 cores, AMD EPYC" in table

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n\n{zoo.BEGIN}\nold\n{zoo.END}\n\nafter\n")
    zoo.write_table(readme, table)
    zoo.write_table(readme, table)  # idempotent
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n\n" + zoo.BEGIN) and text.endswith(zoo.END + "\n\nafter\n")
    assert "old" not in text and text.count("| ConvNeXtTiny |") == 1
    (tmp_path / "plain.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- zoo:begin -->"):
        zoo.write_table(tmp_path / "plain.md", table)


def test_a_source_that_moves_with_rounding_is_called_unstable_not_wrong():
    base = {"input_size": 224, "exported": True, "spread": 1.0, "export_seconds": 70.0, "peak_rss_gb": 2.7,
            "weights_mb": 476.1, "date": "2026-12-06"}
    entries = [
        {**base, "name": "EfficientNetV2L", "config": "default", "rel_diff": 1.0, "rel_diff_unoptimized": 1.0,
         "source_unstable": 0.9},
        {**base, "name": "EfficientNetV2L", "config": "no-top avg", "rel_diff": 0.5, "rel_diff_unoptimized": 0.5,
         "source_unstable": 1e-6},  # Keras is steady here: a wrong export
    ]
    table = zoo.render_table({"meta": {}, "results": entries}, 224)
    assert "yes / **unstable** [1]" in table and "Keras itself moves by 9.0e-01" in table
    assert "yes / **5.0e-01** [2]" in table
    assert "of those, 0 and 0 match Keras" in table
