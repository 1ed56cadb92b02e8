"""``./dev.sh gpu-check``: the GPU production path, end to end, on a machine with one NVIDIA GPU.

    ./dev.sh gpu-check          (set-up, then `toolkit bench gpu-check --gpu-python .venv-gpu/bin/python`)

What it does, within one deadline (8 minutes, set-up not counted; ``--deadline``):

1. refuses, in one ``Error:`` line, a machine without an NVIDIA GPU (never a silent skip), and a GPU
   python whose onnxruntime has no CUDAExecutionProvider;
2. exports the packaged MiniLM as fp16 (``toolkit export bert --fp16``: its accuracy gate runs on the
   CPU) beside the fp32 export ``./dev.sh`` made;
3. generates a repository from the project's own specs with ``bert`` and ``bert_fp16`` on GPU 0
   (``instance_group: {kind: gpu, gpus: [0], count: 2}``, the CUDA accelerator) and the ``embedding``
   ensemble over each (``embedding``, ``embedding_fp16``), and serves it with the GPU python (its
   onnxruntime-gpu runs the ONNX hook's sessions on the GPU);
4. embeds the first 64 sentences of the benchmark corpus through both ensembles and compares each
   vector with the fp32 pipeline on the CPU (``toolkit.bench.pipelines``): cosine >= 0.9999 (fp32),
   >= 0.999 (fp16);
5. runs Triton's perf_analyzer (as ``toolkit bench perf`` does) on both ensembles at concurrency 1,
   16 and 64;
6. writes ``build/gpu-check/report.md`` (and ``results.json``): the GPU, versions, the cosines, the
   perf table, every step's time, PASS or FAIL; a failed threshold or the deadline exits non-zero.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from toolkit.errors import BenchError, ToolkitError

DEADLINE_S = 8 * 60
CONCURRENCY = (1, 16, 64)
MIN_COSINE = {"fp32": 0.9999, "fp16": 0.999}
MODELS = {"fp32": ("bert", "embedding"), "fp16": ("bert_fp16", "embedding_fp16")}
GPU_GROUP = {"kind": "gpu", "gpus": [0], "count": 2}
TEXTS = 64


@dataclass
class GpuCheck:
    """Where things are; ``gpu_python`` is the interpreter whose onnxruntime is onnxruntime-gpu."""

    root: Path
    gpu_python: Path
    out: Path
    deadline_s: float = DEADLINE_S
    #: Every step's seconds, the numbers, and what failed: results.json and report.md.
    results: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def left(self, what: str) -> float:
        left = self.deadline_s - (time.monotonic() - self.started)
        if left <= 0:
            raise BenchError(f"gpu-check passed its {self.deadline_s:.0f} s deadline before {what}")
        return left


def no_gpu_error() -> BenchError | None:
    """The one-line refusal on a machine without an NVIDIA GPU, or None."""
    from toolkit.server.gpus import find_gpus

    inventory = find_gpus()
    if inventory.count:
        return None
    return BenchError(f"no NVIDIA GPU found ({inventory.how}); gpu-check needs one GPU")


def run(check: GpuCheck) -> dict[str, Any]:
    """The whole check; writes the report even when a step fails, then raises that failure."""
    refusal = no_gpu_error()
    if refusal is not None:
        raise refusal
    check.out.mkdir(parents=True, exist_ok=True)
    results = check.results
    results.update(gpu=_describe_gpu(), steps={}, failures=[])
    try:
        _timed(check, "providers", lambda: _gpu_providers(check))
        fp32 = check.root / "model_repository" / "bert" / "1"
        if not (fp32 / "model.onnx").is_file():
            raise BenchError(f"{fp32}/model.onnx is missing: run `toolkit export bert --out {fp32.parent}` first")
        fp16 = _timed(check, "export fp16", lambda: _export_fp16(check))
        repository = _timed(check, "gen-repo", lambda: _repository(check, fp32, fp16))
        _timed(check, "serve, compare, perf", lambda: _serve_and_measure(check, repository, fp32))
    except ToolkitError as e:
        results["failures"].append(str(e))
    finally:
        results["seconds"] = round(time.monotonic() - check.started, 1)
        (check.out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        (check.out / "report.md").write_text(report_markdown(results), encoding="utf-8")
    if results["failures"]:
        raise BenchError(f"gpu-check FAILED: {'; '.join(results['failures'])} (report: {check.out / 'report.md'})")
    return results


def _timed(check: GpuCheck, name: str, step):
    check.left(name)
    start = time.monotonic()
    try:
        return step()
    finally:
        check.results["steps"][name] = round(time.monotonic() - start, 1)


def _describe_gpu() -> str:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"
    return done.stdout.strip().splitlines()[0] if done.stdout.strip() else f"? ({done.stderr.strip()[:100]})"


def _gpu_providers(check: GpuCheck) -> None:
    probe = ("import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); "
             "print(o.__version__, ','.join(o.get_available_providers()))")
    done = subprocess.run([str(check.gpu_python), "-c", probe], capture_output=True, text=True,
                          timeout=min(120, check.left("the onnxruntime-gpu probe")), check=False)
    found = done.stdout.strip()
    check.results["onnxruntime_gpu"] = found
    if done.returncode != 0 or "CUDAExecutionProvider" not in found:
        said = found or done.stderr[-300:]
        raise BenchError(f"{check.gpu_python}'s onnxruntime has no CUDAExecutionProvider ({said}): install "
                         "onnxruntime-gpu there (./dev.sh gpu-check does)")


def _export_fp16(check: GpuCheck) -> Path:
    out = check.out / "bert-fp16"
    command = [sys.executable, "-m", "toolkit.cli", "export", "bert", "--fp16", "--out", str(out), "--version", "1",
               "--overwrite", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=check.left("the fp16 export"), check=False)
    if done.returncode != 0:
        raise BenchError(f"the fp16 export failed: {done.stderr.strip().splitlines()[-1] if done.stderr else '?'}")
    check.results["fp16_gate"] = json.loads((out / "1" / "export.json").read_text())["quantization"]
    return out / "1"


def _repository(check: GpuCheck, fp32: Path, fp16: Path) -> Path:
    """The project's tokenizer, pooling and bert specs, bert on the GPU, twice (fp32 and fp16), with
    an embedding ensemble over each."""
    from toolkit.repository.generate import generate_repository
    from toolkit.repository.project import load_project

    project = check.out / "project"
    shutil.rmtree(project, ignore_errors=True)
    models, ensembles = project / "models", project / "ensembles"
    for name in ("tokenizer", "pooling"):
        shutil.copytree(check.root / "model_repository" / name, models / name, ignore=shutil.ignore_patterns("[0-9]*"))
    bert = yaml.safe_load((check.root / "model_repository" / "bert" / "model.yaml").read_text(encoding="utf-8"))
    bert.pop("instance_count", None)
    bert.update(instance_group=GPU_GROUP, optimization={"gpu_execution_accelerator": {"name": "cuda"}})
    for (name, _), source in zip(MODELS.values(), (fp32, fp16), strict=True):
        (models / name).mkdir(parents=True)
        (models / name / "model.yaml").write_text(yaml.safe_dump(bert, sort_keys=False), encoding="utf-8")
        shutil.copytree(source, models / name / "1")
    ensemble = yaml.safe_load((check.root / "ensembles" / "embedding.yaml").read_text(encoding="utf-8"))
    ensembles.mkdir(parents=True)
    for model, name in MODELS.values():
        steps = [{**s, "model": model if s["model"] == "bert" else s["model"]} for s in ensemble["steps"]]
        spec = {**ensemble, "steps": steps, "api_path": name}
        (ensembles / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return generate_repository(load_project(models, ensembles), check.out / "repository").path


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _serve_and_measure(check: GpuCheck, repository: Path, fp32: Path) -> None:
    from toolkit.bench.processes import process_group, wait_http

    http, grpc, metrics = _free_ports(3)
    command = [str(check.gpu_python), "-m", "toolkit.cli", "serve", "--repository", str(repository),
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
               "--log-file", str(check.out / "tritonserver.log")]
    log = check.out / "serve.log"
    with process_group(command, log) as server:
        try:
            wait_http(f"http://127.0.0.1:{http}/v2/health/ready", server, min(300, check.left("serving")),
                      "toolkit serve (GPU)")
        except BenchError as e:
            said = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
            raise BenchError(f"{e}: {' | '.join(said)}") from None
        _compare(check, f"127.0.0.1:{grpc}", fp32)
        _perf(check, f"127.0.0.1:{grpc}", repository)


def _compare(check: GpuCheck, url: str, fp32: Path) -> None:
    from toolkit.bench.pipelines import EmbeddingPipeline, load_corpus
    from toolkit.client import TritonClient

    texts = load_corpus()[:TEXTS]
    reference = EmbeddingPipeline(fp32)(texts)
    check.results["cosine"] = {}
    with TritonClient(url, protocol="grpc") as client:
        for precision, (_, ensemble) in MODELS.items():
            check.left(f"embedding through {ensemble}")
            served = np.concatenate([client.infer(ensemble, {"TEXT": np.array(
                [[t.encode()] for t in texts[i:i + 8]], dtype=object)})["EMBEDDING"] for i in range(0, len(texts), 8)])
            cosine = np.sum(served * reference, axis=1) / (
                np.linalg.norm(served, axis=1) * np.linalg.norm(reference, axis=1))
            low, mean = float(cosine.min()), float(cosine.mean())
            check.results["cosine"][precision] = {"min": low, "mean": mean, "texts": len(texts),
                                                  "threshold": MIN_COSINE[precision]}
            if not low >= MIN_COSINE[precision]:
                check.results["failures"].append(f"{ensemble}: min cosine {low:.6f} to the CPU fp32 vectors < "
                                                 f"{MIN_COSINE[precision]}")


def _perf(check: GpuCheck, url: str, repository: Path) -> None:
    """perf_analyzer at each concurrency; a point it cannot measure (an unsteady run, its timeout) is a
    failure of the check, and the other points are still measured."""
    from toolkit.bench.perf_analyzer import PerfRequest, find_perf_analyzer, profile

    analyzer = find_perf_analyzer()
    check.results["perf"] = {}
    for precision, (_, ensemble) in MODELS.items():
        for concurrency in CONCURRENCY:
            label = f"{precision} c={concurrency}"
            left = check.left(f"perf_analyzer on {ensemble} at concurrency {concurrency}")
            extra = ["--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval", "2000",
                     "--max-trials", "10", "--stability-percentage", "20"]
            try:
                found = profile(PerfRequest(ensemble, url, "grpc", repository, check.out / "perf" / ensemble /
                                            f"c{concurrency}", extra, timeout_s=min(left, 120)), analyzer)
            except BenchError as e:
                check.results["failures"].append(f"perf_analyzer on {ensemble} at concurrency {concurrency}: {e}")
                continue
            point = found["points"][0]
            check.results["perf"][label] = {k: point[k] for k in ("throughput", "p50_ms", "p99_ms", "server_queue_ms")}


def report_markdown(results: dict[str, Any]) -> str:
    verdict = "FAIL" if results.get("failures") else "PASS"
    lines = [f"# gpu-check: {verdict}", "", f"- GPU: {results.get('gpu', '?')}",
             f"- onnxruntime (GPU python): {results.get('onnxruntime_gpu', '?')}",
             f"- took {results.get('seconds', '?')} s: " + ", ".join(
                 f"{k} {v} s" for k, v in results.get("steps", {}).items())]
    gate = results.get("fp16_gate")
    if gate:
        lines.append(f"- fp16 export gate (CPU, {gate.get('calibration_sentences')} sentences): min cosine "
                     f"{gate['min_cosine']:.6f}, rank agreement {gate['rank_agreement']:.6f}, "
                     f"{gate.get('kept_float32', {}).get('nodes', '?')} nodes kept float32")
    if results.get("cosine"):
        lines += ["", "| served on the GPU | min cosine to CPU fp32 | mean | threshold |",
                  "| --- | ---: | ---: | ---: |"]
        lines += [f"| {p} | {c['min']:.6f} | {c['mean']:.6f} | {c['threshold']} |"
                  for p, c in results["cosine"].items()]
    if results.get("perf"):
        lines += ["", "| perf_analyzer (gRPC) | infer/s | p50 ms | p99 ms | queue ms |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        lines += [f"| {k} | {v['throughput']:.1f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                  f"{v['server_queue_ms']:.2f} |" for k, v in results["perf"].items()]
    if results.get("failures"):
        lines += ["", "## Failures", *[f"- {f}" for f in results["failures"]]]
    return "\n".join(lines) + "\n"
