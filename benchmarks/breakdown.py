"""Where one batch's time goes at c=64 (issue 23): the `embedding` ensemble under load, measured.

    .venv/bin/python benchmarks/breakdown.py --seconds 15       # -> build/bench/breakdown/results.json

For each protocol (gRPC, then HTTP) on one server: a closed-loop load of the sentence corpus at
--concurrency, and over its window every process's CPU (/proc) and Triton's statistics. Then, with
the server stopped, BERT's batches of the gRPC window reproduced in process (their batch sizes from
Triton, the served bucketing) and profiled with onnxruntime. See toolkit/bench/breakdown.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.bench.breakdown import (  # noqa: E402
    batch_table,
    loaded_window,
    padding,
    profile_batches,
    reproduce_batches,
    request_table,
)
from toolkit.bench.loadgen import PointSpec, TargetSpec, run_point  # noqa: E402
from toolkit.bench.roofline import TokenFlops, workload_flops  # noqa: E402
from toolkit.bench.runner import serve  # noqa: E402
from toolkit.bench.workloads import workload  # noqa: E402
from toolkit.client.admin import TritonAdmin  # noqa: E402
from toolkit.runtime.params import read_export  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bert-dir", type=Path, default=ROOT / "model_repository/bert/1")
    parser.add_argument("--contender", default="toolkit", choices=("toolkit", "toolkit-fused"))
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--batches", type=int, default=200, help="BERT batches reproduced and profiled")
    parser.add_argument("--out", type=Path, default=ROOT / "build/bench/breakdown")
    args = parser.parse_args()
    args.out = args.out.absolute()  # the server's command line holds the repository's absolute path
    args.out.mkdir(parents=True, exist_ok=True)
    work = workload("embedding", args.bert_dir.absolute())
    payloads = work.payloads()
    flops, summary = workload_flops("text", work.model_dir, payloads)
    windows = {}
    with serve(args.contender, work, args.out) as (grpc_target, http_url):
        repository = args.out / f"{args.contender}-repository"
        bert = "bert" if args.contender == "toolkit" else work.model
        config = TritonAdmin(http_url).config(bert)
        for protocol, target in (("grpc", grpc_target), ("http", TargetSpec("triton-http", http_url, work.model,
                                                                             work.input_name))):
            run_point(PointSpec(target, payloads, concurrency=args.concurrency, warmup_s=0, measure_s=args.warmup))
            spec = PointSpec(target, payloads, concurrency=args.concurrency, warmup_s=3.0, measure_s=args.seconds,
                             flops=tuple(flops))
            windows[protocol] = loaded_window(spec, http_url, repository)
            point = windows[protocol]["point"]
            print(f"{protocol}: {point['throughput']:.1f} req/s, {point['gflops']:.1f} GFLOP/s, p99 "
                  f"{point['p99_ms']:.0f} ms, errors {point['errors']}", flush=True)
    results = {"concurrency": args.concurrency, "contender": args.contender, "flops": summary, "windows": windows}
    if args.contender == "toolkit":
        texts = [p.decode() for p in payloads]
        batches = reproduce_batches(work.model_dir, config, texts, windows["grpc"]["stats"]["bert"]["batch_sizes"],
                                    limit=args.batches)
        serving = read_export(work.model_dir).get("onnxruntime")
        results["profile"] = profile_batches(work.model_dir / "model.onnx", batches, threads=1, serving=serving)
        results["padding"] = padding(batches, TokenFlops(**{k: summary["formula"][k] for k in
                                                             ("constant", "linear", "quadratic", "by_op")}))
        for protocol, window in windows.items():
            results[f"batch_{protocol}"] = batch_table(window, results["profile"], results["padding"],
                                                       len(os.sched_getaffinity(0)))
    for protocol, window in windows.items():
        steps = ("tokenizer", "bert", "pooling") if args.contender == "toolkit" else ()
        results[f"request_{protocol}"] = request_table(window, work.model, steps)
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    for key, rows in results.items():
        if key.startswith(("batch_", "request_")):
            print(f"\n{key}")
            for row in rows:
                value = row.get("cpu_ms_per_batch", row.get("ms"))
                ours = f"  {row['of_ours']:6.1%} of ours" if "of_ours" in row else ""
                print(f"  {row['part']:<72} {value:8.2f} ms  {row['share']:6.1%}{ours}")
    print(f"\nResults: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
