"""Export defaults, importable without TensorFlow (the CLI shows them in ``--help``)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_OPSET = 17
"""ONNX opset 17: has LayerNormalization, and is served by Triton 24.x's onnxruntime (1.19+)."""

BERT_TOLERANCE: float | None = None
"""No absolute bound by default for BERT: the relative one below applies. TensorFlow and onnxruntime
both run float32 and differ only in summation order and fused kernels: ~1e-6 to 1e-5 on
LayerNorm-scaled outputs (|value| up to ~20), 12 layers included. A wrong transpose, epsilon, mask or
activation moves values by more than 1e-2. ``--tolerance`` adds an absolute bound."""

KERAS_TOLERANCE: float | None = None
"""No absolute bound by default: outputs range from ~1e-11 (an untrained MobileNetV2's features)
to thousands (logits), so only a bound relative to each output's magnitude means the same for all."""

REL_TOLERANCE = 1e-3
"""Keras models: max abs diff relative to each output's peak |value|, per check case. float32
TensorFlow and onnxruntime agree to ~1e-7..5e-5 of the peak on every keras.applications model with
informative weights (export/README.md's table), but a small input (ResNet50 at 32 px: 6e-5 off
float64 on its own) or a near-black image leaves float32 rounding only 2x below 1e-4; onnxruntime's
Pad_Fusion bug on a ResNetV2 stem is 2.7e-2 on in-range images, a wrong conversion 1e-2 and more."""

BERT_REL_TOLERANCE = 1e-4
"""BERT's outputs are LayerNorm-scaled and well conditioned: TensorFlow and onnxruntime agree to
~2e-7 of the peak, so a tighter bound costs nothing and catches a wrong epsilon (~1e-4)."""

BERT_OUT = Path("model_repository/bert")

KERAS_APPLICATIONS = (
    "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtSmall", "ConvNeXtTiny", "ConvNeXtXLarge", "DenseNet121",
    "DenseNet169", "DenseNet201", "EfficientNetB0", "EfficientNetB1", "EfficientNetB2", "EfficientNetB3",
    "EfficientNetB4", "EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "EfficientNetV2B0", "EfficientNetV2B1",
    "EfficientNetV2B2", "EfficientNetV2B3", "EfficientNetV2L", "EfficientNetV2M", "EfficientNetV2S",
    "InceptionResNetV2", "InceptionV3", "MobileNet", "MobileNetV2", "MobileNetV3Large", "MobileNetV3Small",
    "NASNetLarge", "NASNetMobile", "ResNet101", "ResNet101V2", "ResNet152", "ResNet152V2", "ResNet50",
    "ResNet50V2", "VGG16", "VGG19", "Xception",
)
"""keras.applications of Keras 3 (tensorflow-cpu 2.21), so a mistyped name fails before the ~10 s
TensorFlow import; tests/unit/test_export_keras.py checks it against keras itself."""
