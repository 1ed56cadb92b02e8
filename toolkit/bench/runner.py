"""Run the comparison: the in-process limit, then each server under the same load, one at a time.

Contenders, on the same ONNX files, inputs and machine:
    inprocess   (a) the pipeline in this machine's best shape: batches of similar-length texts
    naive       (b) FastAPI + uvicorn, one request -> one pipeline run (what a user writes instead)
    pytriton    (c) PyTriton serving the same callable with @batch (the closest anchor tool)
    toolkit     (d) this toolkit's ensemble on the bundled tritonserver
Each server runs alone while it is measured; the load generator runs in its own process.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.loadgen import PointResult, PointSpec, TargetSpec, run_point
from toolkit.bench.peers import PEERS, serve_peer
from toolkit.errors import ToolkitError
from toolkit.server import free_ports

CONTENDERS = ("inprocess", "naive", "pytriton", "toolkit")
#: Every contender --contenders accepts: the default ones and the peer servers (toolkit/bench/peers).
KNOWN_CONTENDERS = CONTENDERS + PEERS
ROOT = Path(__file__).resolve().parents[2]


class BenchError(ToolkitError):
    """The benchmark cannot produce numbers worth trusting (server not ready, errors, instability)."""


@dataclass(frozen=True)
class Workload:
    name: str  # embedding | mobile: also the model / route name every server uses
    model_dir: Path  # version folder of the ONNX model (bert/1 or mobilenet/1)
    input_name: str
    json_field: str
    steps: tuple[str, ...]  # the toolkit's models behind the ensemble, for the server-side split

    def payloads(self) -> list[bytes]:
        from toolkit.bench.pipelines import load_corpus, make_images

        if self.name == "embedding":
            return [t.encode("utf-8") for t in load_corpus()]
        return make_images(64)


def workload(name: str, model_dir: Path) -> Workload:
    if name == "embedding":
        return Workload(name, model_dir, "TEXT", "texts", ("tokenizer", "bert", "pooling"))
    if name == "mobile":
        return Workload(name, model_dir, "IMAGE", "images", ("preprocess", "mobilenet"))
    raise BenchError(f"unknown workload {name!r}: use embedding or mobile")


@dataclass
class ContenderResult:
    name: str
    points: list[dict[str, Any]] = field(default_factory=list)
    #: inprocess only: throughput per batch size and the batch-1 latency.
    limit: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- (a) in process
def measure_limit_here(name: str, model_dir: str, batch_sizes: list[int], seconds: float) -> dict[str, Any]:
    """Throughput at each batch size (similar-length items batched together) and batch-1 latency."""
    from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline, load_corpus, make_images

    if name == "embedding":
        pipeline: Callable = EmbeddingPipeline(Path(model_dir))
        items: list = load_corpus()
        ordered = sorted(items, key=len)  # similar lengths together: the padding-free best case
    else:
        pipeline = MobilePipeline(Path(model_dir))
        items = ordered = make_images(64)
    pipeline(items[:4])  # warm-up
    throughput = {}
    for batch in batch_sizes:
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for i in range(0, len(ordered), batch):
                pipeline(ordered[i:i + batch])
                done += len(ordered[i:i + batch])
                if time.perf_counter() - start >= seconds:
                    break
        throughput[batch] = done / (time.perf_counter() - start)
    latencies = []
    for item in items[:200]:
        t = time.perf_counter()
        pipeline([item])
        latencies.append((time.perf_counter() - t) * 1000)
    best = max(throughput, key=throughput.get)
    return {"throughput": throughput, "best_batch": best, "best_throughput": throughput[best],
            "batch1_p50_ms": float(np.percentile(latencies, 50))}


def measure_limit(name: str, model_dir: Path, batch_sizes: list[int], seconds: float) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_limit_here, (name, str(model_dir), batch_sizes, seconds))


# ----------------------------------------------------------------------------- servers
def _wait_http(url: str, process: subprocess.Popen | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what} exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise BenchError(f"{what} was not ready at {url} within {timeout:.0f}s")


@contextmanager
def _subprocess(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


@contextmanager
def serve(contender: str, work: Workload, out: Path) -> Iterator[tuple[TargetSpec, str | None]]:
    """Start one contender; yield its load target and its Triton HTTP address (for statistics)."""
    http, grpc, metrics = free_ports(3)
    if contender == "toolkit":
        from toolkit.project import load_project
        from toolkit.repo import generate_repository
        from toolkit.server import TritonServer

        project_dir = out / "toolkit-project"
        shutil.rmtree(project_dir, ignore_errors=True)
        shutil.copytree(ROOT / "model_repository", project_dir / "models", ignore=shutil.ignore_patterns("[0-9]*"))
        shutil.copytree(ROOT / "ensembles", project_dir / "ensembles")
        owner = "bert" if work.name == "embedding" else "mobilenet"
        shutil.copytree(work.model_dir, project_dir / "models" / owner / "1")
        if work.name == "embedding":  # serve only what is measured
            for other in ("preprocess", "mobilenet"):
                shutil.rmtree(project_dir / "models" / other)
            (project_dir / "ensembles" / "mobile.yaml").unlink()
        else:
            for other in ("tokenizer", "bert", "pooling"):
                shutil.rmtree(project_dir / "models" / other)
            (project_dir / "ensembles" / "embedding.yaml").unlink()
        project = load_project(project_dir / "models", project_dir / "ensembles")
        repo = generate_repository(project, out / "toolkit-repository").path
        with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=out / "toolkit-tritonserver.log"):
            yield TargetSpec("triton-grpc", f"127.0.0.1:{grpc}", work.name, work.input_name), f"127.0.0.1:{http}"
    elif contender == "pytriton":
        cmd = [sys.executable, "-m", "toolkit.bench.baselines.pytriton_server", "--workload", work.name,
               "--model-dir", str(work.model_dir), "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics)]
        with _subprocess(cmd, out / "pytriton.log") as process:
            _wait_http(f"http://127.0.0.1:{http}/v2/models/{work.name}/ready", process, 180, "PyTriton")
            yield TargetSpec("triton-grpc", f"127.0.0.1:{grpc}", work.name, work.input_name), f"127.0.0.1:{http}"
    elif contender == "naive":
        cmd = [sys.executable, "-m", "toolkit.bench.baselines.naive", "--workload", work.name,
               "--model-dir", str(work.model_dir), "--host", "127.0.0.1", "--port", str(http)]
        with _subprocess(cmd, out / "naive.log") as process:
            _wait_http(f"http://127.0.0.1:{http}/health", process, 120, "the FastAPI server")
            yield TargetSpec("json-http", f"127.0.0.1:{http}", work.name, json_field=work.json_field), None
    elif contender in PEERS:
        with serve_peer(contender, work, out) as t:
            yield t
    else:
        raise BenchError(f"unknown contender {contender!r}")


def triton_statistics(http_url: str) -> dict[str, dict[str, int]]:
    """Per model: successful requests and nanoseconds spent queueing and computing."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/stats", timeout=10) as r:
        stats = json.load(r)
    out = {}
    for model in stats.get("model_stats", []):
        s = model["inference_stats"]
        out[model["name"]] = {
            "count": int(s["success"]["count"]),
            "queue_ns": int(s["queue"]["ns"]),
            "compute_ns": sum(int(s[k]["ns"]) for k in ("compute_input", "compute_infer", "compute_output")),
        }
    return out


def split(before: dict, after: dict, models: tuple[str, ...] | None) -> dict[str, float]:
    """Per request, summed over the pipeline's models: milliseconds in queue and in compute."""
    queue = compute = 0.0
    for name, a in after.items():
        if (models and name not in models) or name not in before:
            continue
        count = a["count"] - before[name]["count"]
        if count > 0:
            queue += (a["queue_ns"] - before[name]["queue_ns"]) / count / 1e6
            compute += (a["compute_ns"] - before[name]["compute_ns"]) / count / 1e6
    return {"queue_ms": queue, "compute_ms": compute}


def measure_point(spec: PointSpec, stats_url: str | None, models: tuple[str, ...] | None,
                  max_variation: float) -> tuple[PointResult, dict[str, float]]:
    """One point, repeated once with a longer window if it was unsteady."""
    for attempt in range(2):
        before = triton_statistics(stats_url) if stats_url else {}
        result = run_point(spec)
        after = triton_statistics(stats_url) if stats_url else {}
        if result.variation <= max_variation or result.errors:
            break
        if attempt == 0:
            spec = PointSpec(**{**spec.__dict__, "measure_s": spec.measure_s * 1.5})
    return result, (split(before, after, models) if stats_url else {})
