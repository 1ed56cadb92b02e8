"""`./dev.sh gpu-check` on a machine without a GPU: one error line and exit 1, as typed, never a
silent skip; and the report it writes on a GPU machine, from its results."""

from __future__ import annotations

import subprocess
import sys

import pytest
from serving import ROOT

from toolkit.bench.gpu_check import report_markdown
from toolkit.server.gpus import find_gpus

NO_GPU = pytest.mark.skipif(find_gpus().count > 0, reason="this machine has an NVIDIA GPU")
LINE = "Error: no NVIDIA GPU found ("


@NO_GPU
def test_dev_sh_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_1():
    done = subprocess.run(["./dev.sh", "gpu-check"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(LINE), done.stderr
    assert done.stderr.rstrip().endswith("); gpu-check needs one GPU") and "nvidia-smi" in done.stderr


@NO_GPU
def test_toolkit_bench_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_1(tmp_path):
    done = subprocess.run([sys.executable, "-m", "toolkit.cli", "bench", "gpu-check", "--out", str(tmp_path / "g")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and done.stderr.startswith(LINE), done.stderr
    assert "nvidia-smi" in done.stderr and not (tmp_path / "g").exists()


def test_the_report_says_pass_or_fail_with_the_numbers():
    results = {"gpu": "NVIDIA L4, 550.54, 23034 MiB", "onnxruntime_gpu": "1.31.1 CUDAExecutionProvider,CPU",
               "seconds": 301.5, "steps": {"export fp16": 60.2},
               "fp16_gate": {"calibration_sentences": 256, "min_cosine": 0.9999993, "rank_agreement": 0.9999995,
                             "kept_float32": {"nodes": 6}},
               "cosine": {"fp32": {"min": 0.99999, "mean": 0.999995, "threshold": 0.9999},
                          "fp16": {"min": 0.9991, "mean": 0.9995, "threshold": 0.999}},
               "perf": {"fp32 c=1": {"throughput": 410.0, "p50_ms": 2.4, "p99_ms": 3.1, "server_queue_ms": 0.05}},
               "failures": []}
    text = report_markdown(results)
    assert text.startswith("# gpu-check: PASS") and "NVIDIA L4" in text and "| fp16 | 0.999100 |" in text
    assert "| fp32 c=1 | 410.0 | 2.4 | 3.1 | 0.05 |" in text and "6 nodes kept float32" in text
    failed = report_markdown({**results, "failures": ["embedding_fp16: min cosine 0.99 < 0.999"]})
    assert failed.startswith("# gpu-check: FAIL") and "- embedding_fp16: min cosine 0.99 < 0.999" in failed
