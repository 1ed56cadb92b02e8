"""The routes to the roofline, served: forms of the embedding ensemble side by side on the bundled
tritonserver, point by point with the forms alternating (BENCHMARKS.md, "Routes to the roofline").

    .venv/bin/python benchmarks/routes/served.py NAME=REPOSITORY:MODEL [...] \
        [--concurrency 1,16,64] [--workloads embedding,short] [--bulk] [--rounds 2] [--seconds 8]

Each REPOSITORY is a `toolkit gen-repo` output; every distinct one gets one tritonserver (on free
ports of 127.0.0.1) for the whole run, and MODEL is the ensemble (or fused model) to call in it. Each
load point runs every form back to back, in a rotating order, so the machine's drift falls on all
of them alike. Served GFLOP/s counts real tokens only, as benchmarks/routes/inprocess.py does.

Besides wall-clock throughput, each point records the CPU seconds the server (tritonserver and its
python stubs, from /proc) and the load client spent, and how many texts the server answered in that
time (Triton's own count, read once the last request of the point is done): GFLOP per CPU second is
what the form costs, whatever else runs on the machine, and is compared with one core's MatMul rate
(`--clock cpu` of inprocess.py) in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import inprocess  # noqa: E402
from inprocess import encode, text_flop  # noqa: E402

from toolkit.bench.loadgen import PointSpec, TargetSpec, run_point  # noqa: E402
from toolkit.bench.peers import process_tree  # noqa: E402
from toolkit.bench.workloads import workload  # noqa: E402
from toolkit.server import free_ports  # noqa: E402
from toolkit.server.process import TritonServer  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants (tritonserver and its stubs)."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def answered(server: TritonServer, model: str) -> int:
    """Texts ``model`` has answered since the server started (Triton's statistics: batch rows)."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return int(stats["inference_count"])


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("forms", nargs="+", help="NAME=REPOSITORY:MODEL")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--workloads", default="embedding,short")
    parser.add_argument("--bulk", action="store_true", help="also bulk requests of 64 texts at concurrency 4 (on a "
                        "busy machine a window then holds a handful of answers: raise --seconds)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--drain", type=float, default=3.0, help="seconds to wait after a point before counting")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "routes" / "served.json")
    args = parser.parse_args()
    forms = {}
    for spec in args.forms:
        name, _, rest = spec.partition("=")
        repository, _, model = rest.rpartition(":")
        forms[name] = (Path(repository), model)
    points = [(w, int(c), 1) for w in args.workloads.split(",") for c in args.concurrency.split(",")]
    if args.bulk:
        points += [(w, 4, 64) for w in args.workloads.split(",")]
    results: dict = {"forms": {n: [str(r), m] for n, (r, m) in forms.items()}, "points": []}
    with ExitStack() as stack:
        servers = {}
        for repository in dict.fromkeys(r for r, _ in forms.values()):
            http, grpc, metrics = free_ports(3)
            servers[repository] = stack.enter_context(TritonServer(
                repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                log_file=ROOT / "build" / "bench" / "routes" / f"tritonserver-{repository.parent.name}.log"))
        payloads, flop = {}, {}
        for name in args.workloads.split(","):
            load = workload(name, next(iter(forms.values()))[0] / "bert" / "1")
            payloads[name] = load.payloads()
            lengths = [r["input_ids"].shape[1] for r in encode([p.decode() for p in payloads[name]],
                                                                next(iter(forms.values()))[0] / "bert" / "1")]
            flop[name] = sum(text_flop(n) for n in lengths) / len(lengths)
        results["gflop_per_text"] = {k: v / 1e9 for k, v in flop.items()}
        inprocess.clock = inprocess.CLOCKS["cpu"]
        results["core_peak_gflops"] = [inprocess.matmul_peak(1, 1.0)]
        order = list(forms)
        for round_ in range(args.rounds):
            for i, (name, concurrency, items) in enumerate(points):
                shift = (i + round_) % len(order)
                for form in order[shift:] + order[:shift]:
                    repository, model = forms[form]
                    target = TargetSpec("triton-grpc", servers[repository].grpc_url, model)
                    server = servers[repository]
                    server_cpu, client_cpu = tree_cpu_seconds(server.process.pid), children_cpu_seconds()
                    texts = answered(server, model)
                    point = run_point(PointSpec(target, payloads[name], concurrency=concurrency, warmup_s=2,
                                                measure_s=args.seconds, items=items))
                    time.sleep(args.drain)  # the requests still in flight when the window closed
                    texts = max(answered(server, model) - texts, 1)
                    server_cpu = tree_cpu_seconds(server.process.pid) - server_cpu
                    client_cpu = children_cpu_seconds() - client_cpu
                    row = {"round": round_, "workload": name, "concurrency": concurrency, "items": items,
                           "form": form, **point.to_dict(), "gflops": point.items_per_s * flop[name] / 1e9,
                           "server_cpu_s": server_cpu, "client_cpu_s": client_cpu, "texts_answered": texts,
                           "server_cpu_ms_per_text": 1000 * server_cpu / texts,
                           "gflop_per_server_cpu_s": texts * flop[name] / 1e9 / server_cpu}
                    results["points"].append(row)
                    print(f"round {round_} {name:9s} c={concurrency:<3d} x{items:<2d} {form:14s} "
                          f"{point.items_per_s:7.1f} texts/s {row['gflops']:6.1f} GFLOP/s p50 {point.p50_ms:7.1f} "
                          f"p99 {point.p99_ms:7.1f} ms errors {point.errors}; "
                          f"server {row['server_cpu_ms_per_text']:5.2f} CPU ms/text = "
                          f"{row['gflop_per_server_cpu_s']:5.1f} GFLOP per CPU s, client {client_cpu:5.1f} CPU s",
                          flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(results, indent=1) + "\n")  # as it goes: a run may be cut
            results["core_peak_gflops"].append(inprocess.matmul_peak(1, 1.0))
            print(f"round {round_} one core's MatMul peak {results['core_peak_gflops'][-1]:.1f} GFLOP per CPU s",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
