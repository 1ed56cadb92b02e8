"""Check images: what an image model's export is checked with, and what the zoo measures with.

White noise in [-1, 1] is a poor check input for an image model: a model that rescales 0..255
pixels inside sees a nearly black image, where float32 rounding (TensorFlow's as much as
onnxruntime's) is a large part of the answer, and onnxruntime's Pad_Fusion bug on a ResNetV2 stem
shows as 1.7e-4 of the peak instead of 2.7e-2. Smooth random fields in the range the model sees in
use make both the check safer and its failures louder.
"""

from __future__ import annotations

import numpy as np

#: Value ranges of keras.applications inputs, by their ``preprocess_input`` convention.
RAW = (0.0, 255.0)
TF_MODE = (-1.0, 1.0)
TORCH_MODE = (-2.12, 2.64)   # (x / 255 - ImageNet mean) / ImageNet std
CAFFE_MODE = (-124.0, 152.0)  # BGR x - ImageNet mean (103.9, 116.8, 123.7)


def smooth_images(n: int, size: int | tuple[int, int], seed: int = 0, value_range: tuple[float, float] = RAW,
                  channels: int = 3, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` natural-ish float32 images [n, height, width, channels] in ``value_range``: a random 8x8
    grid per channel upsampled bicubically (smooth regions and edges, no pixel noise), with a
    per-image brightness, contrast and colour tint, so images differ as photos do."""
    import tensorflow as tf

    rng = rng if rng is not None else np.random.default_rng(seed)
    height, width = (size, size) if isinstance(size, int) else size
    grid = rng.normal(size=(n, 8, 8, channels)).astype(np.float32)
    field = tf.image.resize(grid, (height, width), method="bicubic").numpy()
    field -= field.mean(axis=(1, 2, 3), keepdims=True)
    field /= field.std(axis=(1, 2, 3), keepdims=True) + 1e-6
    brightness = rng.uniform(0.3, 0.7, size=(n, 1, 1, 1))
    contrast = rng.uniform(0.08, 0.25, size=(n, 1, 1, 1))
    tint = rng.uniform(-0.08, 0.08, size=(n, 1, 1, channels))
    unit = np.clip(brightness + tint + contrast * field, 0.0, 1.0)
    lo, hi = value_range
    return (lo + (hi - lo) * unit).astype(np.float32)


def input_range(name: str) -> tuple[float, float]:
    """The range of values ``keras.applications.NAME`` sees in use: 0..255 for the families that
    rescale inside (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3), else the output range of
    their ``preprocess_input`` ("tf": [-1, 1]; "torch": ImageNet-standardised; "caffe": BGR minus the
    ImageNet mean)."""
    if name.startswith(("EfficientNet", "ConvNeXt", "MobileNetV3")):
        return RAW
    if name.startswith("DenseNet"):
        return TORCH_MODE
    if name.startswith("VGG") or (name.startswith("ResNet") and not name.endswith("V2")):
        return CAFFE_MODE
    return TF_MODE


def looks_like_images(shape: tuple[int | None, ...]) -> bool:
    """NHWC with 1, 3 or 4 channels and room for an 8x8 grid (or variable height and width)."""
    return len(shape) == 4 and shape[-1] in (1, 3, 4) and all(d is None or d >= 8 for d in shape[1:3])
