"""Image hook for Keras MobileNetV2-style classifiers: encoded bytes -> normalised NHWC floats.

go-infer's ``/api/mobile`` entry::

    IMAGE --ImagePreprocess--> image --MobileNetV2 (ONNX)--> probabilities

ImagePreprocess
    input   IMAGE  BYTES [n, 1]                 encoded images (JPEG, PNG, ... see ``formats``)
    output  image  FP32  [n, size, size, 3]     RGB, NHWC, values in [-1, 1]
    parameters
      size        output height and width in pixels (224)
      max_pixels  largest accepted width * height, checked from the header before decoding
                  (40000000): the decompression-bomb guard
      max_request_pixels  largest total width * height of one request's images, read from their
                  headers before any is decoded (100000000): the budget that keeps one request of
                  many large images from holding the instance while others wait (decoding costs
                  ~10 ms per megapixel here)
      max_bytes   largest accepted encoded payload (20971520 = 20 MiB)
      formats     comma-separated Pillow format names accepted ("JPEG,PNG,WEBP,GIF,BMP"); other
                  payloads are not handed to Pillow's other decoders at all
      jpeg_draft  "true" lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale (never below
                  size x size) before the resize: about 2x faster on 2-12 MP JPEGs, but pixels
                  differ slightly (~0.1% mean) from keras' full decode. Default "false" (exact).

What the pixels go through, in keras.utils.load_img's order:
  1. decode with Pillow (first frame of an animation; EXIF orientation is NOT applied, as neither
     keras.utils.load_img nor tf.io.decode_image applies it);
  2. convert to RGB: grayscale is replicated, palette images are expanded, an alpha channel is
     dropped (not composited; keras' ``img.convert("RGB")``), 16-bit grayscale is scaled to 8 bits;
  3. resize the whole image directly to size x size with Pillow's BILINEAR filter (no aspect-
     preserving crop; Pillow antialiases when shrinking, as keras.utils.load_img(target_size) does);
  4. x / 127.5 - 1 in float32, as ``tf.keras.applications.mobilenet_v2.preprocess_input``.

Decoding happens in ``api_entry``, once per request: a corrupt image fails only its own request,
and ``infer`` only concatenates ready arrays. ``api_entry`` therefore returns the request with an
extra ``image`` array (FP32 [n, size, size, 3]) that ``infer`` passes on.

Error codes sent by ``api_entry`` (the client sees ``[code] message``):
    1101  the payload is not a decodable image of an accepted format (Pillow's reason follows)
    1102  the payload is empty
    1103  the payload is over ``max_bytes`` or the image over ``max_pixels``
    1104  IMAGE is missing, not shaped [n, 1] with n >= 1, or holds something other than bytes
    1105  the request's images together are over ``max_request_pixels`` (or ``max_bytes`` x 4 bytes)
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from toolkit.builtins import column_tensor, parse_bool, parse_int
from toolkit.runtime.hooks import Hook, HookContext, HookError

NOT_AN_IMAGE = 1101
EMPTY_IMAGE = 1102
IMAGE_TOO_LARGE = 1103
BAD_IMAGE_TENSOR = 1104
REQUEST_TOO_LARGE = 1105

DEFAULT_SIZE = 224
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_FORMATS = "JPEG,PNG,WEBP,GIF,BMP"
_SIXTEEN_BIT_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class ImagePreprocess(Hook):
    """IMAGE bytes -> MobileNetV2 input (see the module docstring)."""

    api_path = "mobile"

    def init(self, ctx: HookContext) -> None:
        params = ctx.parameters
        self.size = parse_int(params.get("size", DEFAULT_SIZE), "size", minimum=1)
        self.max_pixels = parse_int(params.get("max_pixels", DEFAULT_MAX_PIXELS), "max_pixels", minimum=1)
        self.max_bytes = parse_int(params.get("max_bytes", DEFAULT_MAX_BYTES), "max_bytes", minimum=1)
        self.max_request_pixels = parse_int(params.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS),
                                            "max_request_pixels", minimum=1)
        Image.init()  # register every plugin so the format names below can be checked now
        formats = [name.strip().upper() for name in params.get("formats", DEFAULT_FORMATS).split(",")]
        unknown = [name for name in formats if name not in Image.OPEN]
        if unknown or not formats:
            raise ValueError(f"parameter 'formats' names formats Pillow cannot open: {unknown or formats}")
        self.formats = tuple(formats)
        self.jpeg_draft = parse_bool(params.get("jpeg_draft", False), "jpeg_draft")

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = column_tensor(request, "IMAGE", BAD_IMAGE_TENSOR)
        self._check_budget(payloads[:, 0])
        images = np.empty((payloads.shape[0], self.size, self.size, 3), dtype=np.float32)
        for row, payload in enumerate(payloads[:, 0]):
            self.decode_into(row, payload, images[row])
        return {**request, "image": images}

    def _check_budget(self, payloads: np.ndarray) -> None:
        """The request's total pixels, from the images' headers, before any is decoded. A payload that
        is not a readable image counts nothing here: decoding it reports its own error."""
        total_bytes = sum(len(p) for p in payloads if isinstance(p, bytes))
        if total_bytes > 4 * self.max_bytes:
            raise HookError(REQUEST_TOO_LARGE, f"the request's {len(payloads)} images hold {total_bytes} bytes, "
                                               f"more than {4 * self.max_bytes} per request")
        total = 0
        for payload in payloads:
            if not isinstance(payload, bytes) or not payload:
                continue
            try:
                with Image.open(io.BytesIO(payload), formats=self.formats) as image:
                    width, height = image.size
            except Exception:
                continue
            total += width * height
            if total > self.max_request_pixels:
                raise HookError(REQUEST_TOO_LARGE, f"the request's {len(payloads)} images hold more than "
                                                   f"{self.max_request_pixels / 1e6:g} megapixels, the limit per "
                                                   "request; send them in smaller requests")

    def decode_into(self, row: int, payload: Any, out: np.ndarray) -> None:
        """Decode one payload into ``out`` ([size, size, 3] float32) or raise its HookError."""
        if not isinstance(payload, bytes):
            raise HookError(BAD_IMAGE_TENSOR, f"IMAGE[{row}] must be bytes, got {type(payload).__name__}")
        if not payload:
            raise HookError(EMPTY_IMAGE, f"IMAGE[{row}] is empty")
        if len(payload) > self.max_bytes:
            raise HookError(IMAGE_TOO_LARGE, f"IMAGE[{row}] has {len(payload)} bytes, "
                                             f"more than the limit of {self.max_bytes}")
        try:
            with Image.open(io.BytesIO(payload), formats=self.formats) as image:
                width, height = image.size  # from the header: nothing decoded yet
                if width * height > self.max_pixels:
                    raise HookError(IMAGE_TOO_LARGE, f"IMAGE[{row}] is {width}x{height} pixels, "
                                                     f"more than the limit of {self.max_pixels}")
                if self.jpeg_draft and image.format == "JPEG":
                    image.draft("RGB", (self.size, self.size))
                rgb = _to_rgb(image)
                if rgb.size != (self.size, self.size):
                    rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
                pixels = np.asarray(rgb)
        except HookError:
            raise
        except Image.DecompressionBombError as e:  # Pillow's own guard, past 2 * MAX_IMAGE_PIXELS
            raise HookError(IMAGE_TOO_LARGE, f"IMAGE[{row}] is too large: {e}") from None
        except UnidentifiedImageError:
            raise HookError(NOT_AN_IMAGE, f"IMAGE[{row}] is not a valid image: cannot identify image file "
                                          f"as any of {', '.join(self.formats)}") from None
        except Exception as e:  # Pillow raises many types for bad data (OSError, SyntaxError, ...)
            raise HookError(NOT_AN_IMAGE, f"IMAGE[{row}] is not a valid image: {e}") from None
        # keras.applications.mobilenet_v2.preprocess_input ("tf" mode): x /= 127.5; x -= 1.
        np.divide(pixels, np.float32(127.5), out=out, dtype=np.float32)
        out -= np.float32(1.0)

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "image" in batch:
            return {"image": batch["image"]}
        # api_entry was bypassed: decode here (a bad payload then fails the whole batch).
        payloads = batch["IMAGE"]
        images = np.empty((payloads.shape[0], self.size, self.size, 3), dtype=np.float32)
        for row, payload in enumerate(payloads.reshape(-1)):
            self.decode_into(row, payload, images[row])
        return {"image": images}


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Pillow's own I;16 -> RGB conversion clips at 255, so scale."""
    if image.mode in _SIXTEEN_BIT_GRAY:
        wide = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns on P -> RGB with transparency; same pixels
    if image.mode != "RGB":
        image = image.convert("RGB")
    else:
        image.load()
    return image
