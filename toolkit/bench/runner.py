"""Run the comparison: the in-process limit, then each server under the same load, one at a time.

Contenders, on the same ONNX files, inputs and machine:
    inprocess   (a) the pipeline in this machine's best shape: batches of similar-length texts
    naive       (b) FastAPI + uvicorn, one request -> one pipeline run (what a user writes instead)
    pytriton    (c) PyTriton serving the same callable with @batch (the closest anchor tool)
    toolkit     (d) this toolkit's ensemble on the bundled tritonserver
Each server runs alone while it is measured; the load generator runs in its own process.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.loadgen import PointResult, PointSpec, TargetSpec, run_point
from toolkit.bench.peers import PEERS, serve_peer
from toolkit.bench.processes import process_group, wait_http
from toolkit.bench.workloads import Workload
from toolkit.client.admin import TritonAdmin
from toolkit.errors import BenchError
from toolkit.server import TritonServer, free_ports

#: The toolkit in its forms: the Triton ensemble, ``execution: fused``, and fused with the int8 BERT.
TOOLKIT_FORMS = ("toolkit", "toolkit-fused", "toolkit-int8")
CONTENDERS = ("inprocess", "naive", "pytriton", *TOOLKIT_FORMS)
#: Every contender --contenders accepts: the default ones and the peer servers (toolkit/bench/peers.py).
KNOWN_CONTENDERS = CONTENDERS + PEERS
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ContenderResult:
    name: str
    points: list[dict[str, Any]] = field(default_factory=list)
    #: inprocess only: throughput per batch size and the batch-1 latency.
    limit: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- (a) in process
def _rate(pipeline: Callable, batches: list[list], seconds: float) -> float:
    """Items per second over whole passes through ``batches``, repeated until ``seconds`` have gone
    by (never a part of a pass: a sorted corpus cut short would count only its short items)."""
    done, start = 0, time.perf_counter()
    while True:
        for batch in batches:
            pipeline(batch)
            done += len(batch)
        if time.perf_counter() - start >= seconds:
            return done / (time.perf_counter() - start)


def _stream_batches(items: list, concurrency: int, group: int, size: Callable) -> list[list]:
    """What a server holding ``concurrency`` requests can do with them: take them in arrival order,
    ``concurrency`` at a time, sort each window by length and run it in groups of ``group``."""
    batches = []
    for i in range(0, len(items), concurrency):
        window = sorted(items[i:i + concurrency], key=size)
        batches += [window[j:j + group] for j in range(0, len(window), group)]
    return batches


def measure_limit_here(name: str, model_dir: str, batch_sizes: list[int], seconds: float,
                       concurrencies: list[int] | None = None, payloads: list | None = None) -> dict[str, Any]:
    """The two limits of issue 13, for the workload's items in their arrival order:

    * offline: the whole corpus sorted by length, at each batch size (the best is the limit);
    * stream at concurrency c: ``c`` requests at a time in arrival order, each alone or sorted into
      groups of 4, 8 or 16 (at most c): the best grouping is the limit.

    Plus the batch-1 latency (p50 over 200 items)."""
    from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline

    if name == "mobile":
        pipeline: Callable = MobilePipeline(Path(model_dir))
        size: Callable = len
    else:
        pipeline = EmbeddingPipeline(Path(model_dir))
        size = pipeline.token_count
    items = [p.decode("utf-8") for p in payloads] if name != "mobile" else list(payloads)
    ordered = sorted(items, key=size)
    pipeline(items[:4])  # warm-up
    throughput = {b: _rate(pipeline, [ordered[i:i + b] for i in range(0, len(ordered), b)], seconds)
                  for b in batch_sizes}
    stream = {}
    for c in concurrencies or []:
        groupings = {"alone": [[x] for x in items]}
        groupings.update({f"sorted groups of {g}": _stream_batches(items, c, g, size) for g in (4, 8, 16) if g <= c})
        rates = {label: _rate(pipeline, batches, seconds) for label, batches in groupings.items()}
        best = max(rates, key=rates.get)
        stream[c] = {"rates": rates, "best": best, "throughput": rates[best]}
    latencies = []
    for item in items[:200]:
        t = time.perf_counter()
        pipeline([item])
        latencies.append((time.perf_counter() - t) * 1000)
    best = max(throughput, key=throughput.get)
    return {"throughput": throughput, "best_batch": best, "best_throughput": throughput[best], "stream": stream,
            "batch1_p50_ms": float(np.percentile(latencies, 50))}


def measure_limit(name: str, model_dir: Path, batch_sizes: list[int], seconds: float,
                  concurrencies: list[int] | None = None, payloads: list | None = None) -> dict[str, Any]:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_limit_here, (name, str(model_dir), batch_sizes, seconds, concurrencies, payloads))


def best_limits(first: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """This machine's speed drifts between minutes: each limit is the higher of its two measurements
    (the stricter target for the servers)."""
    best = dict(first if first["best_throughput"] >= again["best_throughput"] else again)
    best["stream"] = {c: max(first["stream"][c], again["stream"][c], key=lambda s: s["throughput"])
                      for c in first["stream"]}
    best["runs"] = [first, again]
    return best


# ----------------------------------------------------------------------------- servers
@contextmanager
def serve(contender: str, work: Workload, out: Path) -> Iterator[tuple[TargetSpec, str | None]]:
    """Start one contender; yield its load target and its Triton HTTP address (for statistics)."""
    http, grpc, metrics = free_ports(3)
    if contender in TOOLKIT_FORMS:
        repo = _toolkit_repository(contender, work, out)
        with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=out / f"{contender}-tritonserver.log"):
            yield TargetSpec("triton-grpc", f"127.0.0.1:{grpc}", work.model, work.input_name), f"127.0.0.1:{http}"
    elif contender == "pytriton":
        cmd = [sys.executable, "-m", "toolkit.bench.servers.pytriton_server", "--workload", work.model,
               "--model-dir", str(work.model_dir), "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics)]
        with process_group(cmd, out / "pytriton.log") as process:
            wait_http(f"http://127.0.0.1:{http}/v2/models/{work.model}/ready", process, 180, "PyTriton")
            yield TargetSpec("triton-grpc", f"127.0.0.1:{grpc}", work.model, work.input_name), f"127.0.0.1:{http}"
    elif contender == "naive":
        cmd = [sys.executable, "-m", "toolkit.bench.servers.naive", "--workload", work.model,
               "--model-dir", str(work.model_dir), "--host", "127.0.0.1", "--port", str(http)]
        with process_group(cmd, out / "naive.log") as process:
            wait_http(f"http://127.0.0.1:{http}/health", process, 120, "the FastAPI server")
            yield TargetSpec("json-http", f"127.0.0.1:{http}", work.model, json_field=work.json_field), None
    elif contender in PEERS:
        with serve_peer(contender, work, out) as t:
            yield t
    else:
        raise BenchError(f"unknown contender {contender!r}")


def _toolkit_repository(contender: str, work: Workload, out: Path) -> Path:
    """The example's repository with only the measured ensemble: as committed (``toolkit``), with
    ``execution: fused`` (``toolkit-fused``), or fused with the int8 BERT (``toolkit-int8``)."""
    import yaml

    from toolkit.repository.generate import generate_repository
    from toolkit.repository.project import load_project

    if contender == "toolkit-int8" and (work.model != "embedding" or work.int8_dir is None):
        raise BenchError("toolkit-int8 needs the embedding workload and an int8 export (--int8-dir)")
    project_dir = out / f"{contender}-project"
    shutil.rmtree(project_dir, ignore_errors=True)
    shutil.copytree(ROOT / "model_repository", project_dir / "models", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", project_dir / "ensembles")
    owner = "bert" if work.model == "embedding" else "mobilenet"
    source = work.int8_dir if contender == "toolkit-int8" else work.model_dir
    shutil.copytree(source, project_dir / "models" / owner / "1")
    others = ("preprocess", "mobilenet", "mobile") if work.model == "embedding" else (
        "tokenizer", "bert", "pooling", "embedding")
    for other in others:  # serve only what is measured
        shutil.rmtree(project_dir / "models" / other, ignore_errors=True)
        (project_dir / "ensembles" / f"{other}.yaml").unlink(missing_ok=True)
    if work.model == "embedding":  # the bench's setting for bulk requests: see BENCHMARKS.md
        bert = project_dir / "models" / "bert" / "model.yaml"
        bert.write_text(bert.read_text() + "\nbucket_rows: true\n")
    if contender != "toolkit":
        path = project_dir / "ensembles" / f"{work.model}.yaml"
        spec = yaml.safe_load(path.read_text())
        fused = {"execution": "fused"}
        path.write_text(yaml.safe_dump({**spec, **fused}, sort_keys=False))
    project = load_project(project_dir / "models", project_dir / "ensembles")
    return generate_repository(project, out / f"{contender}-repository").path


def triton_statistics(http_url: str) -> dict[str, dict[str, int]]:
    """Per model: successful requests and nanoseconds spent queueing and computing."""
    stats = TritonAdmin(http_url).statistics(timeout=10)
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
