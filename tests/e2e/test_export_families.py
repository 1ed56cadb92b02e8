"""One keras.applications model of each family, exported through the library and compared with Keras
on the path Triton serves, independently of the export's own check.

Every model gets informative weights first (``toolkit.export.zoo.informative_weights``: BN statistics
from images, ConvNeXt's layer scales at trained-like values): a ``weights=None`` application barely
depends on its input, so a broken conversion could still "match". The comparison runs fresh smooth
images (a seed the export never sees) through Keras (``training=False``) and through
``toolkit.runtime.onnx_hook.session`` with export.json's serving entry, as the ONNX hook serves the
file; each test also asserts that the Keras outputs vary across those images, so the comparison can
fail. Inputs are the smallest each family accepts, to keep the file fast (all of it ~2.5 min on 2
cores); the weights are seeded, so every run compares the same models.

Float32 noise: random-weight networks amplify rounding more than trained ones. Against a float64
Keras, float32 Keras is off by ~6e-5 of the peak for ResNet50 at 32 px and InceptionV3 at 75 px (the
worst here), by 1e-6..3e-5 for the others; a wrong conversion is off by 1e-2 and more.

The last test serves ResNet50V2 (224x224, the size where onnxruntime 1.31.1's optimizer was seen to
fold the stem's Pad into its MaxPool, 6 % off) on the real tritonserver and compares its HTTP answer.
"""

from __future__ import annotations

import random
import shutil
import socket

import pytest
import yaml
from click.testing import CliRunner

from toolkit.export.zoo import (
    CALIBRATION_SEED,
    calibration_count,
    informative_weights,
    input_range,
    keras_outputs,
    max_rel_diff,
    pair_outputs,
    served_outputs,
    smooth_images,
    spread,
)

pytestmark = pytest.mark.slow

REL_LIMIT = 1e-4
#: Keras outputs must vary across the check images by at least this much of their peak (100x the
#: limit), or a model that ignores its input would pass.
MIN_SPREAD = 1e-2
CHECK_SEED = 2024
CHECK_IMAGES = 4

#: name -> (input size: the smallest the family accepts, include_top, pooling)
FAMILIES = {
    "ResNet50": (32, True, None),
    "ResNet50V2": (224, False, "avg"),  # the Triton test's export (fixture resnet50v2_224)
    "EfficientNetB0": (32, True, None),
    "EfficientNetV2B0": (96, True, None),  # at 32 px its calibrated BN variances are ~0: chaotic
    "ConvNeXtTiny": (32, False, "avg"),
    "DenseNet121": (32, True, None),
    "InceptionV3": (75, True, None),
    "Xception": (71, True, None),
    "MobileNetV3Small": (32, True, None),
    "NASNetMobile": (32, True, None),
    "VGG16": (32, False, "avg"),
}


def informative_application(name: str, size: int, include_top: bool, pooling: str | None):
    """``keras.applications.NAME`` with seeded random weights made informative (BN statistics from
    smooth images, as the zoo harness does)."""
    import keras

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(weights=None, include_top=include_top, pooling=pooling,
                                              input_shape=(size, size, 3))
    informative_weights(model, smooth_images(calibration_count(size), size, CALIBRATION_SEED, input_range(name)))
    return model


def assert_served_matches(model, version_dir, images):
    reference, served = pair_outputs(keras_outputs(model, images), served_outputs(version_dir, images))
    varies = spread(reference)
    assert varies >= MIN_SPREAD, f"Keras outputs barely vary across the check images ({varies:.2g}): no test"
    rel = max_rel_diff(reference, served)
    if rel > REL_LIMIT:
        _, plain = pair_outputs(keras_outputs(model, images), served_outputs(version_dir, images, optimized=False))
        pytest.fail(f"served ONNX differs from Keras by {rel:.2e} of the peak (limit {REL_LIMIT:g}); "
                    f"with onnxruntime's graph optimizations off: {max_rel_diff(reference, plain):.2e}")


@pytest.fixture
def fresh_keras():
    yield
    import keras

    keras.backend.clear_session()


@pytest.fixture(scope="module")
def resnet50v2_224(tmp_path_factory):
    """ResNet50V2 at 224x224, include_top=False, pooling="avg", informative weights, exported once:
    the ResNetV2 family's model here and the model the Triton test serves. Returns (model, report)."""
    from toolkit.export import export_keras_model

    model = informative_application("ResNet50V2", 224, False, "avg")
    report = export_keras_model(model, tmp_path_factory.mktemp("resnet50v2") / "resnet50v2", 1)
    return model, report


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_exports_and_serves_what_keras_computes(name, tmp_path, request, fresh_keras):
    from toolkit.export import export_keras_model

    size, include_top, pooling = FAMILIES[name]
    if name == "ResNet50V2":  # shared with the Triton test below: one export instead of two
        model, report = request.getfixturevalue("resnet50v2_224")
    else:
        model = informative_application(name, size, include_top, pooling)
        report = export_keras_model(model, tmp_path / name.lower(), 1)
    images = smooth_images(CHECK_IMAGES, size, CHECK_SEED, input_range(name))
    assert_served_matches(model, report.version_dir, images)


def _ports(count: int, low: int = 9400, high: int = 9500) -> list[int]:
    """``count`` ports of [low, high) that are free on 127.0.0.1 right now."""
    candidates = list(range(low, high))
    random.shuffle(candidates)
    found = []
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError(f"fewer than {count} free ports in {low}-{high - 1}")


@pytest.mark.e2e
def test_resnet50v2_at_224_served_by_triton_answers_what_keras_computes(tmp_path, resnet50v2_224):
    from toolkit.cli.main import cli
    from toolkit.client import TritonClient
    from toolkit.server import TritonServer

    model, report = resnet50v2_224
    folder = tmp_path / "models" / "resnet50v2"
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(yaml.safe_dump({"kind": "onnx", "max_batch_size": 4}))
    shutil.copytree(report.version_dir, folder / "1")
    (tmp_path / "ensembles").mkdir()
    result = CliRunner().invoke(cli, ["gen-repo", "--models", str(tmp_path / "models"),
                                      "--ensembles", str(tmp_path / "ensembles"), "--out", str(tmp_path / "repo")])
    assert result.exit_code == 0, result.output

    images = smooth_images(2, 224, CHECK_SEED, input_range("ResNet50V2"))
    expected = keras_outputs(model, images)
    (input_name,) = [t.name for t in report.inputs]
    http, grpc, metrics = _ports(3)
    with TritonServer(tmp_path / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log") as server, \
            TritonClient(server.http_url, protocol="http") as client:
        answer = client.infer("resnet50v2", {input_name: images})
    reference, served = pair_outputs(expected, answer)
    assert spread(reference) >= MIN_SPREAD
    rel = max_rel_diff(reference, served)
    if rel > REL_LIMIT:
        _, plain = pair_outputs(expected, served_outputs(report.version_dir, images, optimized=False))
        pytest.fail(f"Triton's answer differs from Keras by {rel:.2e} of the peak (limit {REL_LIMIT:g}); "
                    f"locally with onnxruntime's graph optimizations off: {max_rel_diff(reference, plain):.2e}")
