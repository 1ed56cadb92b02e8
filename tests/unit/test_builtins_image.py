"""toolkit.builtins.image: encoded image bytes -> MobileNetV2 input, and the requests it refuses."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from toolkit.builtins.image import ImagePreprocess
from toolkit.hooks import HookContext, HookError


def make_hook(model_dir: Path, **parameters: str) -> ImagePreprocess:
    hook = ImagePreprocess()
    hook.init(HookContext(model_name="pre", model_version=1, model_dir=model_dir, parameters=parameters))
    return hook


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def image_request(*payloads) -> dict[str, np.ndarray]:
    column = np.empty((len(payloads), 1), dtype=object)
    for row, payload in enumerate(payloads):
        column[row, 0] = payload
    return {"IMAGE": column}


def preprocess(hook: ImagePreprocess, *requests: dict[str, np.ndarray]) -> np.ndarray:
    """What the adapter does: api_entry per request, then one infer on the concatenation."""
    accepted = [hook.api_entry(request) for request in requests]
    batch = {name: np.concatenate([request[name] for request in accepted]) for name in accepted[0]}
    outputs = hook.infer(batch)
    assert list(outputs) == ["image"]
    return outputs["image"]


def keras_value(pixel: int) -> np.float32:
    """tf.keras.applications.mobilenet_v2.preprocess_input on one uint8 value, in float32."""
    return np.float32(pixel) / np.float32(127.5) - np.float32(1.0)


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0, 0, 0] * 254)
    if transparent:
        image.info["transparency"] = 1
    return image


def sixteen_bit_gray(value: int) -> Image.Image:
    return Image.fromarray(np.full((12, 9), value, dtype=np.uint16))


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (16, 16), (0, 0, 0, 0)), "JPEG", quality=100)


@pytest.mark.parametrize(("payload", "expected_rgb"), [
    (encode(Image.new("RGB", (64, 48), (0, 128, 255))), (0, 128, 255)),
    (encode(Image.new("L", (30, 300), 77)), (77, 77, 77)),
    (encode(Image.new("LA", (30, 30), (90, 10))), (90, 90, 90)),
    (encode(Image.new("RGBA", (50, 50), (200, 10, 20, 0))), (200, 10, 20)),
    (encode(palette_image(transparent=False)), (10, 200, 30)),
    (encode(palette_image(transparent=True)), (10, 200, 30)),
    (encode(Image.new("1", (40, 40), 1)), (255, 255, 255)),
    (encode(sixteen_bit_gray(128 * 257)), (128, 128, 128)),
    (encode(sixteen_bit_gray(65535)), (255, 255, 255)),
    (encode(Image.new("RGB", (224, 224), (0, 128, 255)), "GIF"), (0, 128, 255)),
    (encode(Image.new("RGB", (10, 10), (0, 128, 255)), "BMP"), (0, 128, 255)),
    (encode(Image.new("RGB", (10, 10), (0, 128, 255)), "WEBP", lossless=True), (0, 128, 255)),
    (cmyk_jpeg(), (255, 255, 255)),
], ids=["rgb_png", "gray_png", "gray_alpha_png", "rgba_png_alpha_dropped", "palette_png",
        "palette_transparent_png", "bilevel_png", "gray16_png_mid", "gray16_png_max", "gif", "bmp", "webp",
        "cmyk_jpeg"])
def test_image_preprocess_maps_solid_colour_to_keras_values_when_format_or_mode_varies(
        tmp_path, payload, expected_rgb):
    image = preprocess(make_hook(tmp_path), image_request(payload))

    assert image.shape == (1, 224, 224, 3) and image.dtype == np.float32
    expected = np.array([keras_value(channel) for channel in expected_rgb], dtype=np.float32)
    np.testing.assert_array_equal(image[0, 100, 37], expected)
    assert np.array_equal(image.min(axis=(0, 1, 2)), expected) and np.array_equal(image.max(axis=(0, 1, 2)),
                                                                                   expected)


def test_image_preprocess_maps_extremes_to_minus_one_and_one_when_pixels_are_0_and_255(tmp_path):
    image = preprocess(make_hook(tmp_path), image_request(encode(Image.new("RGB", (5, 5), (0, 255, 128)))))

    assert image[0, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(0.00392157, abs=1e-7)]


def test_image_preprocess_equals_direct_bilinear_resize_when_image_is_not_square(tmp_path):
    rng = np.random.default_rng(3)
    source = Image.fromarray(rng.integers(0, 256, size=(90, 300, 3), dtype=np.uint8))

    image = preprocess(make_hook(tmp_path), image_request(encode(source)))

    resized = np.asarray(source.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    np.testing.assert_array_equal(image[0], resized / np.float32(127.5) - np.float32(1.0))


def test_image_preprocess_decodes_jpeg_close_to_source_when_quality_is_high(tmp_path):
    gradient = np.tile(np.linspace(0, 255, 224, dtype=np.uint8)[None, :, None], (224, 1, 3))
    payload = encode(Image.fromarray(gradient), "JPEG", quality=98)

    image = preprocess(make_hook(tmp_path), image_request(payload))

    pixels = (image[0] + 1.0) * 127.5
    assert np.abs(pixels - gradient).max() <= 4.0
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_image_preprocess_resizes_to_size_parameter_when_set(tmp_path):
    image = preprocess(make_hook(tmp_path, size="32"), image_request(encode(Image.new("RGB", (64, 64)))))

    assert image.shape == (1, 32, 32, 3)


def test_image_preprocess_keeps_row_order_when_requests_hold_several_images(tmp_path):
    red, green, blue = (encode(Image.new("RGB", (8, 8), colour)) for colour in
                        [(255, 0, 0), (0, 255, 0), (0, 0, 255)])

    image = preprocess(make_hook(tmp_path), image_request(red, green), image_request(blue))

    assert image.shape == (3, 224, 224, 3)
    assert [int(np.argmax(image[row, 5, 5])) for row in range(3)] == [0, 1, 2]


def test_image_preprocess_decodes_in_infer_when_api_entry_is_bypassed(tmp_path):
    hook = make_hook(tmp_path, size="4")

    outputs = hook.infer(image_request(encode(Image.new("RGB", (8, 8), (255, 0, 0)))))

    assert outputs["image"].shape == (1, 4, 4, 3)
    assert outputs["image"][0, 0, 0].tolist() == [1.0, -1.0, -1.0]


def png_header_only(width: int, height: int) -> bytes:
    """A 60-byte PNG that claims width x height (8-bit RGB) and whose pixel data is an empty IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


@pytest.mark.parametrize(("request_", "code", "fragment"), [
    (image_request(b"hello, I am text, not an image"), 1101, "IMAGE[0] is not a valid image"),
    (image_request(encode(Image.new("RGB", (8, 8)))[:40]), 1101, "IMAGE[0] is not a valid image"),
    (image_request(encode(Image.new("RGB", (64, 64)), "JPEG")[:300]), 1101, "Truncated File Read"),
    (image_request(encode(Image.new("RGB", (8, 8)), "TIFF")), 1101, "cannot identify image file as any of JPEG, PNG"),
    (image_request(encode(Image.new("RGB", (8, 8))), b""), 1102, "IMAGE[1] is empty"),
    (image_request(png_header_only(10_000, 5_000)), 1103, "10000x5000 pixels"),
    (image_request(png_header_only(200_000, 200_000)), 1103, "IMAGE[0]"),
    (image_request(b"\xff" * (20 * 1024 * 1024 + 1)), 1103, "20971521 bytes"),
    (image_request("a str, not bytes"), 1104, "IMAGE[0] must be bytes, got str"),
    ({"IMAGE": np.array([b"x"], dtype=object)}, 1104, "shape [n, 1]"),
    ({"IMAGE": np.empty((0, 1), dtype=object)}, 1104, "n >= 1"),
    ({"TEXT": np.array([[b"x"]], dtype=object)}, 1104, "no IMAGE tensor"),
], ids=["text_payload", "cut_png", "cut_jpeg", "tiff_not_accepted", "empty", "over_max_pixels",
        "pillow_bomb_guard", "over_max_bytes", "str_element", "flat", "no_rows", "missing"])
def test_image_preprocess_api_entry_rejects_with_code_when_payload_is_bad(tmp_path, request_, code, fragment):
    hook = make_hook(tmp_path)

    with pytest.raises(HookError) as caught:
        hook.api_entry(request_)

    assert caught.value.code == code
    assert fragment in caught.value.message


def test_image_preprocess_rejects_with_1103_when_pixels_exceed_parameter(tmp_path):
    hook = make_hook(tmp_path, max_pixels="400")
    hook.api_entry(image_request(encode(Image.new("RGB", (20, 20)))))  # exactly 400: accepted

    with pytest.raises(HookError) as caught:
        hook.api_entry(image_request(encode(Image.new("RGB", (20, 21)))))

    assert caught.value.code == 1103


def test_image_preprocess_accepts_tiff_when_formats_parameter_lists_it(tmp_path):
    hook = make_hook(tmp_path, formats="png, tiff")

    image = preprocess(hook, image_request(encode(Image.new("RGB", (8, 8), (255, 255, 255)), "TIFF")))

    assert image.min() == 1.0


@pytest.mark.parametrize("parameters", [{"size": "0"}, {"max_pixels": "many"}, {"formats": "PNG,NOPE"},
                                        {"jpeg_draft": "sometimes"}])
def test_image_preprocess_init_raises_value_error_when_configuration_is_wrong(tmp_path, parameters):
    with pytest.raises(ValueError):
        make_hook(tmp_path, **parameters)


def test_image_preprocess_stays_close_to_exact_decode_when_jpeg_draft_enabled(tmp_path):
    rows, cols = np.mgrid[0:1200, 0:1600]
    smooth = np.stack([cols * 255 // 1599, rows * 255 // 1199, (rows + cols) * 255 // 2798], axis=-1)
    request = image_request(encode(Image.fromarray(smooth.astype(np.uint8)), "JPEG", quality=95))

    exact = preprocess(make_hook(tmp_path), request)
    drafted = preprocess(make_hook(tmp_path, jpeg_draft="true"), request)

    assert drafted.shape == exact.shape == (1, 224, 224, 3)
    assert not np.array_equal(drafted, exact)  # libjpeg really decoded at a reduced scale
    assert np.abs(drafted - exact).mean() < 0.01
