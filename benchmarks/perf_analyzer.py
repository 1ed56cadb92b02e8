"""perf_analyzer beside the bench's own load generator, on one server, at the same concurrency
(BENCHMARKS.md, "perf_analyzer beside `toolkit bench load`").

    .venv/bin/python benchmarks/perf_analyzer.py [--concurrency 1,16,64] [--seconds 10]
                                                 [--out build/bench/perf_analyzer]

Serves the example's `embedding` and `mobile` ensembles (the committed specs, the exports in
model_repository/*/1: ./dev.sh demo makes them) on one tritonserver, and for each workload and
concurrency runs `toolkit bench load`'s closed loop and `toolkit bench perf` (perf_analyzer from
.venv-perf, gRPC, the same sentences and images) one after the other, then again in the other order,
so both see the same warm server and the machine's drift shows; each records its client's CPU (cores).
perf_analyzer: windows of --seconds/3, stability 30 % over 4 windows; a point that does not settle is
measured again accepting any spread, and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.bench.loadgen import PointSpec, TargetSpec, run_point  # noqa: E402
from toolkit.bench.perf_analyzer import PerfRequest, find_perf_analyzer, profile  # noqa: E402
from toolkit.bench.workloads import workload  # noqa: E402
from toolkit.errors import BenchError  # noqa: E402
from toolkit.repository.generate import generate_repository  # noqa: E402
from toolkit.repository.project import load_project  # noqa: E402
from toolkit.server import TritonServer, free_ports  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--seconds", type=float, default=10.0, help="Window of each point (both tools).")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2, help="2: bench load then perf_analyzer, "
                        "then the other way round.")
    parser.add_argument("--models", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "perf_analyzer")
    args = parser.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    analyzer = find_perf_analyzer()
    repository = generate_repository(load_project(args.models, ROOT / "ensembles"), args.out / "repository").path
    window_ms = str(int(args.seconds * 1000 / 3))
    results = {"machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                           "load_average_before": os.getloadavg()},
               "perf_analyzer": analyzer.version(), "seconds": args.seconds, "points": []}
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=args.out / "tritonserver.log") as server:
        for name in ("embedding", "mobile"):
            work = workload(name, args.models / ("bert" if name == "embedding" else "mobilenet") / "1")
            target = TargetSpec("triton-grpc", server.grpc_url, work.model, work.input_name)
            payloads = work.payloads()
            for c in concurrencies:
                point = {"workload": name, "concurrency": c, "bench_load": [], "perf_analyzer": []}
                for order in (("load", "perf"), ("perf", "load"))[:args.rounds]:  # A B, then B A: drift shows
                    for tool in order:
                        if tool == "load":
                            point["bench_load"].append(measure_load(target, payloads, c, args))
                        else:
                            point["perf_analyzer"].append(measure_perf(analyzer, work.model, server.grpc_url,
                                                                       repository, c, window_ms, args.out))
                results["points"].append(point)
                for tool in ("bench_load", "perf_analyzer"):
                    runs = "  ".join(f"{r.get('throughput', 0):.1f}/s p50 {r.get('p50_ms', 0):.1f} p99 "
                                     f"{r.get('p99_ms', 0):.1f} client {r['client_cores']:.2f} cores"
                                     for r in point[tool])
                    print(f"{name} c={c} {tool}: {runs}", flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"Results: {args.out / 'results.json'}")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_load(target, payloads, c: int, args) -> dict:
    """`toolkit bench load`'s closed loop (its own process); client_cores: that process's CPU / its wall time."""
    cpu, wall = _children_cpu_s(), time.monotonic()
    load = run_point(PointSpec(target, payloads, concurrency=c, warmup_s=args.warmup, measure_s=args.seconds))
    return {"throughput": load.throughput, "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.errors,
            "completed": load.completed, "client_cores": (_children_cpu_s() - cpu) / (time.monotonic() - wall)}


def measure_perf(analyzer, model: str, url: str, repository: Path, c: int, window_ms: str, out: Path) -> dict:
    """`toolkit bench perf` at one concurrency (an explicit range end: one sync thread per request)."""
    cpu, wall = _children_cpu_s(), time.monotonic()
    unsettled = []
    for stability, trials in (("30", "4"), ("100", "3")):
        extra = ["--concurrency-range", f"{c}:{c}", "-p", window_ms, "-s", stability, "-r", trials]
        try:
            perf = profile(PerfRequest(model, url, "grpc", repository, out / f"{model}-c{c}", extra), analyzer)
        except BenchError as e:
            unsettled.append(str(e))
            continue
        client = (_children_cpu_s() - cpu) / (time.monotonic() - wall)
        return perf["points"][0] | {"stability_percent": int(stability), "unsettled": unsettled,
                                    "client_cores": client}
    return {"failed": unsettled, "client_cores": 0.0}


if __name__ == "__main__":
    main()
