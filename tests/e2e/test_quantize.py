"""`toolkit export bert --quantize int8`: the accuracy gate, what it writes, and the int8 model served
by the `embedding` ensemble on the real tritonserver, checked against the fp32 embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving import example_repository, free_ports

from toolkit.bench.pipelines import EmbeddingPipeline, load_corpus
from toolkit.client import TritonClient
from toolkit.export.quantize import Gate, QuantizationError, calibration_sentences, quantize_bert
from toolkit.lifecycle.golden import GOLDEN_FILE, compare_golden, read_golden
from toolkit.server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]


@pytest.fixture(scope="module")
def int8_export(tmp_path_factory) -> Path:
    from toolkit.export import export_bert

    report = export_bert(None, tmp_path_factory.mktemp("int8") / "bert", 1, quantize="int8")
    assert report.quantization and "int8 vs fp32" in report.quantization
    return report.version_dir


def test_int8_export_records_the_gate_and_is_smaller(int8_export, minilm_export):
    q = json.loads((int8_export / "export.json").read_text())["quantization"]
    assert q["scheme"] == "int8" and q["calibration_sentences"] == len(calibration_sentences()) >= 200
    assert q["min_cosine"] >= Gate().min_cosine and q["mean_cosine"] >= Gate().min_mean_cosine
    assert q["rank_agreement"] >= Gate().min_rank and q["min_cosine"] <= q["mean_cosine"] <= 1.0
    assert (int8_export / "model.onnx").stat().st_size < 0.7 * (minilm_export / "model.onnx").stat().st_size
    assert sorted(p.name for p in int8_export.iterdir()) == ["export.json", GOLDEN_FILE, "model.onnx", "vocab.txt"]


def test_int8_golden_sample_is_the_int8_models_own(int8_export):
    """A rollout checks golden.npz: the int8 model must pass it, and the fp32 numbers must not be
    what it is held to (it differs from them by design)."""
    import onnxruntime as ort

    golden = read_golden(int8_export / GOLDEN_FILE)
    session = ort.InferenceSession(str(int8_export / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    actual = dict(zip(names, session.run(names, golden.inputs), strict=True))
    assert compare_golden(golden, actual) == []
    wrong = {k: v + 0.5 for k, v in actual.items()}
    assert compare_golden(golden, wrong)


def test_a_model_missing_the_gate_is_not_written(minilm_export, tmp_path):
    target = tmp_path / "model.onnx"
    with pytest.raises(QuantizationError) as caught:
        quantize_bert(minilm_export / "model.onnx", target, minilm_export / "vocab.txt",
                      gate=Gate(min_cosine=0.9999))
    message = str(caught.value)
    assert "min cosine" in message and "< 0.9999" in message and "nothing was written" in message
    assert not target.exists()


def test_cli_refuses_a_failed_gate_with_the_numbers_and_exit_1(tmp_path):
    result = subprocess.run([*TOOLKIT, "export", "bert", "--quantize", "int8", "--min-mean-cosine", "0.99999",
                             "--out", str(tmp_path / "bert"), "--quiet"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stderr
    assert "Error: the int8 model missed the accuracy gate" in result.stderr
    assert "mean cosine 0.9" in result.stderr and "< 0.99999" in result.stderr
    assert not (tmp_path / "bert" / "1").exists()


def test_cli_rejects_a_threshold_outside_minus_one_to_one_before_exporting(tmp_path):
    result = subprocess.run([*TOOLKIT, "export", "bert", "--quantize", "int8", "--min-rank", "1.5",
                             "--out", str(tmp_path / "bert")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "--min-rank must lie in [-1, 1], got 1.5" in result.stderr
    assert "loading TensorFlow" not in result.stderr


def test_served_int8_embeddings_match_fp32(int8_export, minilm_export, mobilenet_export, tmp_path):
    """The int8 model behind the real `embedding` ensemble, against the fp32 pipeline in process."""
    repository = example_repository(tmp_path, int8_export, mobilenet_export)
    texts = load_corpus()[:48]
    reference = EmbeddingPipeline(minilm_export)(texts)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log") as server, \
            TritonClient(server.grpc_url, protocol="grpc") as client:
        served = np.concatenate([
            client.infer("embedding", {"TEXT": np.array([[t.encode()] for t in texts[i:i + 8]], dtype=object)})[
                "EMBEDDING"] for i in range(0, len(texts), 8)])
    assert served.shape == reference.shape == (48, 384)
    cosine = np.sum(served * reference, axis=1) / np.linalg.norm(served, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.97 and cosine.mean() >= 0.985, (cosine.min(), cosine.mean())
    assert cosine.min() < 0.99999  # it really is the int8 model, not the fp32 one
