"""Export TensorFlow/Keras models to ONNX, each export checked against onnxruntime.

    export_bert(source, out_dir, version)   Google BERT checkpoint / HF safetensors / packaged MiniLM
    export_keras(source, out_dir, version)  .keras / .h5 / SavedModel / keras.applications name
    export_keras_model(model, out_dir)      an in-memory keras.Model

Both write ``<out_dir>/<version>/model.onnx`` + ``export.json`` atomically and return an
``ExportReport``. The exporters are imported on first use: importing this package does not import
TensorFlow (a few seconds), so ``toolkit --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolkit.export.report import CheckResult, ExportReport, TensorInfo

if TYPE_CHECKING:
    from toolkit.export.bert import export_bert
    from toolkit.export.keras_models import export_keras, export_keras_model

__all__ = ["CheckResult", "ExportReport", "TensorInfo", "export_bert", "export_keras", "export_keras_model"]

_LAZY = {"export_bert": "toolkit.export.bert", "export_keras": "toolkit.export.keras_models",
         "export_keras_model": "toolkit.export.keras_models"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'toolkit.export' has no attribute '{name}'")
