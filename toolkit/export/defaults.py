"""Export defaults, importable without TensorFlow (the CLI shows them in ``--help``)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_OPSET = 17
"""ONNX opset 17: has LayerNormalization, and is served by Triton 24.x's onnxruntime (1.19+)."""

BERT_TOLERANCE = 1e-4
"""Max abs diff allowed between onnxruntime and Keras for BERT. Both run float32 and differ only in
summation order and fused kernels: ~1e-6 to 1e-5 on LayerNorm-scaled outputs (|value| up to ~20),
even over 12 layers. A wrong transpose, epsilon, mask or activation moves values by more than 1e-2."""

KERAS_TOLERANCE = 1e-4
"""Absolute; float32 CNNs and MLPs agree between TF and onnxruntime to ~1e-6 of their output scale."""

REL_TOLERANCE = 1e-3
"""Relative to an output's peak |value|: what catches a broken conversion of an untrained model whose
outputs are ~1e-11 (MobileNetV2 with weights=None), where no absolute tolerance can."""

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
