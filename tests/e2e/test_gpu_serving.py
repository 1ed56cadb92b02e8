"""A GPU spec served on this CPU-only machine: refused before tritonserver starts, a clear load error
when the check is bypassed, and the CPU fallback only where the spec allows it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from onnx_models import LINEAR_B, LINEAR_W, write_linear_onnx
from projects import write_model
from serving import free_ports

from toolkit.errors import ModelLoadError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer
from toolkit.server.gpus import find_gpus

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
if find_gpus().count:  # these tests are about a machine without one
    pytestmark.append(pytest.mark.skip(reason="this machine has an NVIDIA GPU"))


def gpu_repository(tmp_path: Path, **spec) -> Path:
    root = tmp_path / "project"
    write_model(root, "linear", {"kind": "onnx", "max_batch_size": 8,
                                 "instance_group": {"kind": "gpu", "count": 1}, **spec})
    write_linear_onnx(root / "models" / "linear" / "1" / "model.onnx")
    return generate_repository(load_project(root / "models", None), tmp_path / "repo").path


def serve_args(repo: Path) -> list[str]:
    http, grpc, metrics = free_ports(3)
    return ["serve", "--repository", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics), "--log-file", str(repo.parent / "triton.log")]


def test_serve_refuses_a_gpu_spec_without_a_gpu_in_one_error_line_before_starting(tmp_path):
    repo = gpu_repository(tmp_path)
    started = time.monotonic()
    done = subprocess.run([*TOOLKIT, *serve_args(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: linear: the spec asks for a GPU"), done.stderr
    assert "no NVIDIA GPU" in lines[0] and "allow_cpu_fallback: true" in lines[0]
    assert not (tmp_path / "triton.log").exists()  # no tritonserver was started
    assert time.monotonic() - started < 60


def test_the_hook_fails_the_load_naming_onnxruntime_gpu_when_the_check_is_bypassed(tmp_path):
    repo = gpu_repository(tmp_path)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=tmp_path / "triton.log")
    with pytest.raises(ModelLoadError) as info:
        server.start()
    assert set(info.value.failures) == {"linear"}
    reason = info.value.failures["linear"]
    assert "asks for GPU 0" in reason and "no CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason


def test_serve_runs_a_gpu_spec_on_the_cpu_only_when_it_allows_the_fallback(tmp_path):
    from toolkit.client import TritonClient

    repo = gpu_repository(tmp_path, allow_cpu_fallback=True)
    args = serve_args(repo)
    process = subprocess.Popen([*TOOLKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from bounded import read_until

        banner = "".join(read_until(process, "Press Ctrl-C", 120))
        assert "Triton is ready with linear" in banner, banner
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        with TritonClient(f"127.0.0.1:{args[6]}", protocol="grpc") as client:
            y = client.infer("linear", {"x": x})["y"]
        np.testing.assert_allclose(y, x @ LINEAR_W + LINEAR_B, rtol=1e-6)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)
    assert process.returncode == 0


def test_gpu_checks_repository_puts_both_berts_on_gpu_0_and_serve_refuses_it_here(tmp_path, minilm_export):
    """What `./dev.sh gpu-check` serves, generated from the project's own specs on this machine: every
    config Triton's, bert and bert_fp16 on GPU 0 behind their own embedding ensembles."""
    from google.protobuf import text_format
    from serving import ROOT
    from tritonclient.grpc import model_config_pb2

    from toolkit.bench.gpu_check import GpuCheck, _repository

    check = GpuCheck(root=ROOT, gpu_python=Path(sys.executable), out=tmp_path / "gpu-check")
    repo = _repository(check, minilm_export, minilm_export)
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "bert", "bert_fp16", "embedding", "embedding_fp16", "pooling", "tokenizer"]
    for name in ("bert", "bert_fp16"):
        config = text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        params = {k: v.string_value for k, v in config.parameters.items()}
        assert params["gpu.devices"] == "0,0" and params["gpu.accelerator"] == "cuda"
        assert "gpu.allow_cpu_fallback" not in params
    ensemble = text_format.Parse((repo / "embedding_fp16" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert [s.model_name for s in ensemble.ensemble_scheduling.step] == ["tokenizer", "bert_fp16", "pooling"]
    done = subprocess.run([*TOOLKIT, *serve_args(repo)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("Error: bert, bert_fp16: the spec asks for a GPU")
