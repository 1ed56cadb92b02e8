"""Where one batch's time goes under load: measured, piece by piece (issue 23).

Under a closed-loop load (c=64 by default) on the served `embedding` ensemble:

* every process's CPU time over the window, from /proc: tritonserver (Triton's core, the HTTP/gRPC
  front ends, the ensemble's hand-offs), each step's python stub, and the load client;
* Triton's own statistics over the same window: per step, its batches (executions), queue and
  compute (input / infer / output) time, the ensemble's end-to-end time, BERT's batch sizes;
* the BERT step's batches reproduced in process from those batch sizes and the corpus (its arrival
  order), through the served batching code (``run_batch``, the served config's buckets), and run by
  onnxruntime with its profiler on (the served session recipe, one thread: what a loaded instance
  gets): matrix products against every other operator, and padded FLOPs against real ones.

Nothing is estimated from a model of the machine; where two measurements are combined (the BERT
stubs' CPU split in the profile's proportions), the report says so.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import tempfile
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.bench.loadgen import PointSpec, run_point_here
from toolkit.errors import BenchError

#: Operators that are matrix products (onnxruntime's names after its graph optimizer).
MATRIX_OPS = ("MatMul", "Gemm", "Attention", "Conv")
CLOCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- CPU time per process
def server_processes(repository: Path) -> dict[str, list[int]]:
    """tritonserver and its python stubs serving ``repository``, by label (``tritonserver``, or the
    stub's model name), found by the repository path on their command line (read-only)."""
    found: dict[str, list[int]] = {}
    repo = str(Path(repository).absolute())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0].endswith("tritonserver") and f"--model-repository={repo}" in argv:
            found.setdefault("tritonserver", []).append(int(entry.name))
        elif argv[0].endswith("triton_python_backend_stub") and argv[1:2] and argv[1].startswith(repo + "/"):
            model = Path(argv[1]).relative_to(repo).parts[0]
            found.setdefault(model, []).append(int(entry.name))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK


def _cpu(processes: dict[str, list[int]]) -> dict[str, float]:
    return {label: sum(cpu_seconds(p) for p in pids) for label, pids in processes.items()}


# ----------------------------------------------------------------------------- one loaded window
def _load(spec: PointSpec, results) -> None:
    results.put(run_point_here(spec))


def loaded_window(spec: PointSpec, stats_url: str, repository: Path) -> dict[str, Any]:
    """Run ``spec`` in a process of its own; over its measurement window, take every process's CPU
    and Triton's statistics (both before and after: the differences are the window's)."""
    from toolkit.client.admin import TritonAdmin

    admin = TritonAdmin(stats_url)
    processes = server_processes(repository)
    if "tritonserver" not in processes:
        raise BenchError(f"no tritonserver serving {repository} found in /proc")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    client = context.Process(target=_load, args=(spec, queue))
    client.start()
    try:
        processes["load client"] = [client.pid]
        time.sleep(spec.warmup_s)
        before = (time.perf_counter(), _cpu(processes), admin.statistics(timeout=10))
        time.sleep(spec.measure_s)
        after = (time.perf_counter(), _cpu(processes), admin.statistics(timeout=10))
        result = queue.get(timeout=spec.target.timeout_s + 60)
    finally:
        client.join(timeout=30)
        if client.is_alive():
            client.kill()
    return {"point": result.to_dict(), "seconds": after[0] - before[0],
            "cpu_s": {k: after[1][k] - before[1][k] for k in after[1]},
            "stats": stats_delta(before[2], after[2])}


def stats_delta(before: dict, after: dict) -> dict[str, dict[str, Any]]:
    """Per model, over the window: requests, executions (batches), ns per phase, batch sizes."""
    old = {m["name"]: m for m in before.get("model_stats", [])}
    out = {}
    for model in after.get("model_stats", []):
        prior = old.get(model["name"])
        if prior is None:
            continue
        now, was = model["inference_stats"], prior["inference_stats"]
        phases = {k: int(now[k]["ns"]) - int(was[k]["ns"]) for k in
                  ("success", "queue", "compute_input", "compute_infer", "compute_output")}
        sizes = Counter({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in model.get("batch_stats", [])})
        sizes.subtract({int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in prior.get("batch_stats", [])})
        out[model["name"]] = {"requests": int(now["success"]["count"]) - int(was["success"]["count"]),
                              "executions": int(model["execution_count"]) - int(prior["execution_count"]),
                              "ns": phases, "batch_sizes": {b: n for b, n in sorted(sizes.items()) if n > 0}}
    return out


# ----------------------------------------------------------------------------- BERT's batches in process
class _Recorder:
    """Stands in for the ONNX hook inside ``run_batch``: keeps every batch it is given (what
    onnxruntime would run) and answers zeros of the configured output shapes."""

    def __init__(self, layout):
        self.layout, self.calls = layout, []

    def api_entry(self, request):
        return request

    def infer(self, batch):
        self.calls.append(batch)
        rows, length = next(iter(batch.values())).shape[:2]
        return {name: np.zeros([rows, *(length if d == -1 else d for d in spec.dims)], spec.dtype)
                for name, spec in self.layout.outputs.items()}


def reproduce_batches(bert_dir: Path, config: dict, texts: list[str], batch_sizes: dict[int, int],
                      limit: int = 200, seed: int = 0) -> list[list[dict[str, np.ndarray]]]:
    """BERT's dynamic batches as the served path forms them: the batch sizes Triton counted (at most
    ``limit`` batches, in proportion), each filled with the next requests in arrival order (the
    corpus, as the load generator sends it), each request tokenized alone (the tokenizer step), and
    split into length buckets by ``run_batch`` with the served config. Returns, per batch, the
    onnxruntime feeds it makes."""
    from toolkit.bench.pipelines import text_tokenizer
    from toolkit.runtime.batching import Layout, run_batch

    total = sum(batch_sizes.values())
    if not total:
        raise BenchError("Triton counted no BERT batches: nothing to reproduce")
    sizes = [b for b, n in batch_sizes.items() for _ in range(max(1, round(n * min(1.0, limit / total))))]
    np.random.default_rng(seed).shuffle(sizes)
    tokenizer = text_tokenizer(bert_dir)
    layout = Layout.from_config(config)
    batches, start = [], 0
    for size in sizes:
        texts_in = [np.array([[texts[(start + i) % len(texts)].encode()]], dtype=object) for i in range(size)]
        requests = [tokenizer.infer(tokenizer.api_entry({"TEXT": t})) for t in texts_in]
        start += size
        recorder = _Recorder(layout)
        run_batch(recorder, requests, layout)
        batches.append(recorder.calls)
    return batches


def profile_batches(model_path: Path, batches: list[list[dict[str, np.ndarray]]], threads: int = 1,
                    serving: dict | None = None) -> dict[str, Any]:
    """Run every batch's feeds through onnxruntime (the served session recipe, ``threads`` threads)
    twice: plain, for the CPU ms per batch (this process's CPU time, which on a shared machine
    differs from wall time), then with the profiler on (its per-node bookkeeping costs CPU too),
    for the wall ms by operator and for whole runs."""
    import onnxruntime as ort

    from toolkit.runtime.onnx_hook import session as served_session

    def run_all(session) -> tuple[float, float]:
        outputs = [o.name for o in session.get_outputs()]
        session.run(outputs, batches[0][0])  # warm-up, left out
        started, cpu = time.perf_counter(), time.process_time()
        for calls in batches:
            for feed in calls:
                session.run(outputs, feed)
        return time.perf_counter() - started, time.process_time() - cpu

    wall, cpu = run_all(served_session(ort, model_path, threads, "false", serving))
    with tempfile.TemporaryDirectory() as tmp:
        def profiled_options():
            options = ort.SessionOptions()
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "bert")
            return options

        profiled = types.SimpleNamespace(SessionOptions=profiled_options, ExecutionMode=ort.ExecutionMode,
                                         GraphOptimizationLevel=ort.GraphOptimizationLevel,
                                         InferenceSession=ort.InferenceSession)
        session = served_session(profiled, model_path, threads, "false", serving)
        profiled_wall, profiled_cpu = run_all(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted((e["ts"], e["dur"]) for e in events if e.get("name") == "model_run")[1:]
    first = runs[0][0] if runs else 0
    by_op: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            by_op[e["args"]["op_name"]] += e["dur"]
    n = len(batches)
    return {"batches": n, "calls": sum(len(c) for c in batches), "threads": threads,
            "wall_ms_per_batch": wall * 1e3 / n, "cpu_ms_per_batch": cpu * 1e3 / n,
            "profiled_wall_ms_per_batch": profiled_wall * 1e3 / n, "profiled_cpu_ms_per_batch": profiled_cpu * 1e3 / n,
            "run_ms_per_batch": sum(d for _, d in runs) / 1e3 / n,
            "op_ms_per_batch": {op: us / 1e3 / n for op, us in by_op.most_common()}}


def padding(batches: list[list[dict[str, np.ndarray]]], flops, mask: str = "attention_mask") -> dict[str, float]:
    """FLOPs of the padded shapes onnxruntime ran against those of the real tokens (``flops``: a
    TokenFlops), per batch."""
    real = padded = 0.0
    for calls in batches:
        for feed in calls:
            rows, length = feed[mask].shape[:2]
            padded += rows * flops(length)
            real += float(np.sum(flops(feed[mask].sum(axis=1))))
    n = len(batches)
    return {"real_gflop_per_batch": real / 1e9 / n, "padded_gflop_per_batch": padded / 1e9 / n,
            "waste": 1 - real / padded if padded else 0.0}


def is_matrix_op(op: str) -> bool:
    return any(m in op for m in MATRIX_OPS)


# ----------------------------------------------------------------------------- the tables
def batch_table(window: dict[str, Any], profile: dict[str, Any], pad: dict[str, float], cores: int,
                bert: str = "bert") -> list[dict[str, Any]]:
    """Where one BERT batch's CPU goes: CPU ms per BERT batch, its share of our processes' CPU, and
    its share of the machine's time per batch (cores x the window / BERT's batches).

    BERT's onnxruntime rows are the reproduced batches' CPU in process (profiler off), split in the
    proportions of onnxruntime's profile (matrix-product kernels, other kernels, between kernels);
    "BERT stub, the rest" is the stubs' CPU under load minus that."""
    batches = window["stats"][bert]["executions"]
    if not batches:
        raise BenchError("no BERT batch ran in the window")
    budget = cores * window["seconds"] * 1e3 / batches
    cpu = {k: v * 1e3 / batches for k, v in window["cpu_s"].items()}
    ops = profile["op_ms_per_batch"]
    scale = profile["cpu_ms_per_batch"] / profile["run_ms_per_batch"]  # the profile's shares of the CPU
    matrix = scale * sum(ms for op, ms in ops.items() if is_matrix_op(op))
    kernels = scale * sum(ops.values())
    rows = [("BERT: matrix products (onnxruntime kernels)", matrix),
            ("  of which padding (padded FLOPs' share)", matrix * pad["waste"]),
            ("BERT: other operators (kernels)", kernels - matrix),
            ("BERT: onnxruntime between kernels", profile["cpu_ms_per_batch"] - kernels),
            ("BERT stub, the rest (hook, buckets, stacking, stub hand-off)",
             cpu.get(bert, 0) - profile["cpu_ms_per_batch"])]
    server = "tritonserver (Triton, HTTP/gRPC, ensemble hand-offs)"
    rows += [(server if label == "tritonserver" else f"{label} stub", ms)
             for label, ms in cpu.items() if label not in (bert, "load client")]
    rows.append(("load client (same cores)", cpu.get("load client", 0)))
    ours = sum(cpu.values())
    rows.append(("not ours: idle or other processes", budget - ours))
    return [{"part": part, "cpu_ms_per_batch": ms, "share": ms / budget, "of_ours": ms / ours} for part, ms in rows]


def request_table(window: dict[str, Any], ensemble: str, steps: tuple[str, ...]) -> list[dict[str, Any]]:
    """One request's latency, from Triton's statistics and the client: each step's queue and
    compute, the hand-offs (the ensemble's end-to-end time minus its steps'), and the protocol and
    client (the client's mean latency minus the ensemble's end-to-end time)."""
    stats = window["stats"]
    requests = stats[ensemble]["requests"]
    if not requests:
        raise BenchError(f"no {ensemble} request completed in the window")

    def per_request(model: str, *phases: str) -> float:
        return sum(stats[model]["ns"][p] for p in phases) / 1e6 / requests

    rows = []
    for step in steps:
        rows += [(f"{step}: queue", per_request(step, "queue")),
                 (f"{step}: compute input + output", per_request(step, "compute_input", "compute_output")),
                 (f"{step}: compute infer", per_request(step, "compute_infer"))]
    server = per_request(ensemble, "success")
    rows.append(("hand-offs between steps (ensemble end-to-end minus the steps)", server - sum(ms for _, ms in rows)))
    rows.append(("protocol and client (client latency minus the ensemble's end-to-end)",
                 window["point"]["mean_ms"] - server))
    total = window["point"]["mean_ms"]
    return [{"part": part, "ms": ms, "share": ms / total} for part, ms in rows]
