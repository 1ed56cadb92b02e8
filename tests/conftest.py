"""Session-wide fixtures: real exports, made once per test run and shared by the tests that need them."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def minilm_report(tmp_path_factory):
    """The packaged all-MiniLM-L6-v2 exported to ONNX (and checked against Keras): the ExportReport."""
    from toolkit.export import export_bert

    return export_bert(None, tmp_path_factory.mktemp("minilm") / "bert", 1)


@pytest.fixture(scope="session")
def minilm_export(minilm_report) -> Path:
    """The MiniLM export's version folder (model.onnx, vocab.txt, export.json)."""
    return minilm_report.version_dir


@pytest.fixture(scope="session")
def mobilenet_export(tmp_path_factory) -> Path:
    """MobileNetV2 (random weights, include_top=False, avg pooling) as the `mobile` service expects it."""
    from toolkit.export import export_keras

    out = tmp_path_factory.mktemp("mobilenet")
    export_keras("MobileNetV2", out, 1, include_top=False, pooling="avg", input_name="image",
                 output_name="embedding")
    return out / "1"
