"""The routes to the roofline, in process: each BERT variant's real-token GFLOP/s at the served batch
shapes, beside this machine's onnxruntime MatMul peak measured in the same run (BENCHMARKS.md,
"Routes to the roofline").

    .venv/bin/python benchmarks/routes/inprocess.py NAME=VERSION_DIR [NAME=VERSION_DIR ...] \
        [--rounds 3] [--seconds 3] [--threads 2] [--out build/bench/routes/inprocess.json]

Each VERSION_DIR is a `toolkit export bert` folder (model.onnx, vocab.txt, export.json), optionally
with its own length-bucket cost (`DIR@16`; default `--bucket-cost`, the committed spec's 8). Batches go
through the served code (the ONNX hook, `run_batch` with the committed spec's padding and length
buckets), so padding waste counts against a variant exactly as it does served. FLOPs are counted on
real tokens only: per token 21.2 MFLOP of matrix products (MiniLM-L6) plus attention's 2 x 2 x L x 384
per layer for a text of L tokens. The variants run interleaved, `--rounds` times, and every round is
kept (the machine is shared: read the spread).

`--clock cpu` counts the process's CPU seconds instead of wall seconds, and the peak is then one
thread's MatMul rate per CPU second: a fraction that other people's jobs on the same cores barely
move (they stretch wall time, not the CPU time a run needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from toolkit.bench.pipelines import load_corpus  # noqa: E402
from toolkit.bench.workloads import SHORT_WORDS  # noqa: E402
from toolkit.builtins.text import WordPieceTokenizer  # noqa: E402
from toolkit.runtime.batching import Layout, TensorLayout, run_batch  # noqa: E402
from toolkit.runtime.hooks import HookContext  # noqa: E402
from toolkit.runtime.onnx_hook import OnnxModel  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE = 6, 384, 1536
MATMUL_FLOP_PER_TOKEN = LAYERS * 2 * (4 * HIDDEN**2 + 2 * HIDDEN * INTERMEDIATE)  # 21.2 M


def text_flop(length: int) -> float:
    return length * (MATMUL_FLOP_PER_TOKEN + LAYERS * 2 * 2 * length * HIDDEN)


def bert_layout(bucket_cost: float) -> Layout:
    ints = {n: TensorLayout(n, np.dtype(np.int64), (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")}
    return Layout(max_batch_size=64, inputs=ints,
                  outputs={"last_hidden_state": TensorLayout("last_hidden_state", np.dtype(np.float32), (-1, HIDDEN)),
                           "pooler_output": TensorLayout("pooler_output", np.dtype(np.float32), (HIDDEN,))},
                  pad={n: 0.0 for n in ints}, trim={"last_hidden_state": "input_ids"}, bucket_cost=bucket_cost)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def matmul_peak(threads: int, seconds: float) -> float:
    """GFLOP/s of onnxruntime's MatMul at MiniLM's FFN shape (640x384 by 384x1536), default session."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((384, 1536)).astype(np.float32)
    weight = helper.make_tensor("w", TensorProto.FLOAT, weights.shape, weights)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, (640, 384))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (640, 1536))], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((640, 384)).astype(np.float32)
    for _ in range(5):
        session.run(None, {"x": x})
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        for _ in range(10):
            session.run(None, {"x": x})
        best = max(best, 10 * 2 * 640 * 384 * 1536 / (clock() - start) / 1e9)
    return best


def load_hook(version_dir: Path, threads: int) -> OnnxModel:
    hook = OnnxModel()
    hook.init(HookContext(model_name="bert", model_version=1, model_dir=version_dir,
                          parameters={"intra_op_threads": str(threads)}))
    return hook


def encode(texts: list[str], version_dir: Path) -> list[dict[str, np.ndarray]]:
    tokenizer = WordPieceTokenizer()
    tokenizer.init(HookContext(model_name="tokenizer", model_version=1, model_dir=version_dir,
                               parameters={"max_seq_length": "256"}))
    return [tokenizer.api_entry({"TEXT": np.array([[t.encode("utf-8")]], dtype=object)}) for t in texts]


def groups(requests: list[dict], size: int, seed: int) -> list[list[dict]]:
    """The requests in a random order, ``size`` at a time: what a dynamic batch holds."""
    order = np.random.default_rng(seed).permutation(len(requests))
    return [[requests[i] for i in order[s:s + size]] for s in range(0, len(order), size)]


def sorted16(requests: list[dict]) -> list[list[dict]]:
    """The offline limit's batches: the corpus sorted by length, 16 at a time, taken in a random order
    (a window that ends early then samples every length, not only the shortest)."""
    ordered = sorted(requests, key=lambda r: r["input_ids"].shape[1])
    batches = [ordered[s:s + 16] for s in range(0, len(ordered), 16)]
    return [batches[i] for i in np.random.default_rng(0).permutation(len(batches))]


def measure(hooks: dict[str, tuple[OnnxModel, Layout]], batches: list[list[dict]], seconds: float) -> dict:
    """Run the batches once per variant, batch by batch with the variants alternating (the machine's
    load then falls on all of them alike), for about ``seconds`` per variant: real-token GFLOP/s,
    texts/s and per-batch ms of each."""
    names = list(hooks)
    times: dict[str, list[float]] = {n: [] for n in names}
    flop = texts = 0.0
    deadline = time.perf_counter() + seconds * len(names)
    i = 0
    while i < len(batches) and (time.perf_counter() < deadline or i < 4):
        batch = batches[i]
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = clock()
            run_batch(hooks[name][0], batch, hooks[name][1])
            times[name].append(clock() - start)
        flop += sum(text_flop(r["input_ids"].shape[1]) for r in batch)
        texts += len(batch)
        i += 1
    return {n: {"gflops": flop / sum(t) / 1e9, "texts_per_s": texts / sum(t),
                "batch_ms_p50": 1000 * statistics.median(t), "batches": len(t)} for n, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", help="NAME=VERSION_DIR[@BUCKET_CALL_COST]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bucket-cost", type=float, default=8.0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--shapes", default="", help="only these points, e.g. doc/alone,short/alone")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "routes" / "inprocess.json")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    peak_threads = 1 if args.clock == "cpu" else args.threads
    variants = {}
    for spec in args.variants:
        name, _, rest = spec.partition("=")
        path, _, cost = rest.partition("@")
        variants[name] = (Path(path), float(cost) if cost else args.bucket_cost)
    loaded: dict[Path, OnnxModel] = {}
    hooks = {}
    for name, (path, cost) in variants.items():  # one session per file, however many bucket costs
        if path not in loaded:
            loaded[path] = load_hook(path, args.threads)
        hooks[name] = (loaded[path], bert_layout(cost))
    first = next(iter(variants.values()))[0]
    corpus = load_corpus()
    short = [t for t in corpus if SHORT_WORDS[0] <= len(t.split()) <= SHORT_WORDS[1]]
    requests = {"doc": encode(corpus, first), "short": encode(short, first)}
    shapes = {f"{w}/{label}": batches for w, reqs in requests.items() for label, batches in {
        "alone": groups(reqs, 1, 1)[:64],
        "random8": groups(reqs, 8, 0), "random32": groups(reqs, 32, 0),
        "sorted16": sorted16(reqs),
    }.items()}
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if k in args.shapes.split(",")}
    results: dict = {"threads": args.threads, "clock": args.clock, "peak_threads": peak_threads,
                     "variants": {n: [str(p), c] for n, (p, c) in variants.items()}, "peak_gflops": [], "points": {}}
    for round_ in range(args.rounds):
        results["peak_gflops"].append(matmul_peak(peak_threads, 1.0))
        for shape, batches in shapes.items():
            for name, point in measure(hooks, batches, args.seconds).items():
                results["points"].setdefault(shape, {}).setdefault(name, []).append(point)
                print(f"round {round_} {shape:16s} {name:12s} {point['gflops']:6.1f} GFLOP/s "
                      f"{point['texts_per_s']:7.1f} texts/s  batch p50 {point['batch_ms_p50']:6.2f} ms", flush=True)
        print(f"round {round_} MatMul peak {results['peak_gflops'][-1]:.1f} GFLOP/s", flush=True)
    peak = max(results["peak_gflops"])
    print(f"\npeak {peak:.1f} GFLOP/s (max of {args.rounds}); median fraction of it per point:")
    for shape, by_name in results["points"].items():
        cells = "  ".join(f"{n} {statistics.median(p['gflops'] for p in pts) / peak:.3f}" for n, pts in by_name.items())
        print(f"  {shape:16s} {cells}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
