"""Throughput at concurrency 32 with 1, 2 and 3 local replicas of the example's `embedding` ensemble,
all on this machine, balanced by gRPC's round_robin (BENCHMARKS.md, "Scaling out").

    .venv/bin/python benchmarks/replicas.py [--seconds 15] [--out build/bench/replicas.json]

Needs the exported example (./dev.sh demo does it) and an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.bench.loadgen import PointSpec, TargetSpec, run_point  # noqa: E402
from toolkit.bench.runner import workload  # noqa: E402
from toolkit.repository.generate import generate_repository  # noqa: E402
from toolkit.repository.project import load_project  # noqa: E402
from toolkit.server import free_ports  # noqa: E402
from toolkit.server.replicas import ReplicaSet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "replicas.json")
    args = parser.parse_args()
    repository = generate_repository(load_project(ROOT / "model_repository", ROOT / "ensembles"),
                                     ROOT / "build" / "bench" / "replicas_repository").path
    payloads = workload("embedding", ROOT / "model_repository" / "bert" / "1").payloads()
    results = {}
    for count in (1, 2, 3):
        base = free_ports(1)[0]
        with ReplicaSet(repository, count, http_port=base, log_dir=args.out.parent) as replicas:
            target = TargetSpec("triton-grpc", ",".join(replicas.grpc_addresses), "embedding")
            point = run_point(PointSpec(target, payloads, concurrency=args.concurrency, warmup_s=3,
                                        measure_s=args.seconds))
        results[count] = point.to_dict()
        print(f"{count} replica(s): {point.throughput:.1f} req/s, p50 {point.p50_ms:.1f} ms, "
              f"p99 {point.p99_ms:.1f} ms, errors {point.errors}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
