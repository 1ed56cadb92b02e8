"""`toolkit export bert --fp16` on the real MiniLM: the gate's numbers in export.json, and the fp16
model behind the `embedding` ensemble on the real tritonserver (CPU), against the fp32 embeddings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from serving import example_repository, free_ports

from toolkit.bench.pipelines import EmbeddingPipeline, load_corpus
from toolkit.client import TritonClient
from toolkit.export.quantize import FP16_GATE
from toolkit.lifecycle.golden import GOLDEN_FILE
from toolkit.server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fp16") / "bert"
    done = subprocess.run([*TOOLKIT, "export", "bert", "--fp16", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stderr
    assert "fp16 vs fp32   : over 256 calibration sentences min cosine" in done.stdout
    return out / "1"


def test_fp16_export_records_the_gate_and_halves_the_model(fp16_export, minilm_export):
    q = json.loads((fp16_export / "export.json").read_text())["quantization"]
    assert q["scheme"] == "fp16" and q["calibration_sentences"] >= 200 and q["gate"] == {
        "min_cosine": FP16_GATE.min_cosine, "min_mean_cosine": FP16_GATE.min_mean_cosine,
        "min_rank": FP16_GATE.min_rank}
    assert q["min_cosine"] >= 0.9999 and q["rank_agreement"] >= 0.9999  # measured: 0.9999993, 0.9999995
    # MiniLM's LayerNorm squares reach 49,920: those nodes stay float32, the rest has 4x headroom
    assert 0 < q["kept_float32"]["nodes"] < 20
    assert q["largest_float16_activation"]["abs"] < 65504 / 4
    size, fp32_size = (fp16_export / "model.onnx").stat().st_size, (minilm_export / "model.onnx").stat().st_size
    assert 0.45 < size / fp32_size < 0.55
    graph = onnx.load(str(fp16_export / "model.onnx"), load_external_data=False).graph
    assert {t.type.tensor_type.elem_type for t in [*graph.input, *graph.output]} <= {
        onnx.TensorProto.INT64, onnx.TensorProto.FLOAT}  # the inputs and outputs clients see are unchanged
    assert sorted(p.name for p in fp16_export.iterdir()) == ["export.json", GOLDEN_FILE, "model.onnx", "vocab.txt"]


def test_served_fp16_embeddings_match_fp32(fp16_export, minilm_export, mobilenet_export, tmp_path):
    repository = example_repository(tmp_path, fp16_export, mobilenet_export)
    texts = load_corpus()[:32]
    reference = EmbeddingPipeline(minilm_export)(texts)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log", load_models=("embedding", "tokenizer", "bert",
                                                                          "pooling")) as server, \
            TritonClient(server.grpc_url, protocol="grpc") as client:
        served = np.concatenate([
            client.infer("embedding", {"TEXT": np.array([[t.encode()] for t in texts[i:i + 8]], dtype=object)})[
                "EMBEDDING"] for i in range(0, len(texts), 8)])
    cosine = np.sum(served * reference, axis=1) / np.linalg.norm(served, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.999, cosine.min()
    assert cosine.min() < 1 - 1e-9  # it really is the fp16 model, not the fp32 one
