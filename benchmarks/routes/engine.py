"""Route 5 (BENCHMARKS.md, "Routes to the roofline"): is onnxruntime the ceiling? The same BERT file
run by onnxruntime and by OpenVINO's CPU plugin, in process, one thread, by CPU time, beside each
engine's own MatMul rate at MiniLM's shapes (the roofline per core).

OpenVINO is not a dependency of the toolkit; give it a venv of its own:

    python3 -m venv build/ov && build/ov/bin/pip install openvino==2026.4.1 onnxruntime==1.31.1 \
        numpy==1.26.4 onnx tokenizers
    build/ov/bin/python benchmarks/routes/engine.py [--bert-dir model_repository/bert/1] [--seconds 20]

Batches: the corpus sorted by length, 16 at a time (offline / bulk), and 32 random texts sorted and
cut into 4 runs of 8 (about what the served hook's length buckets make of a dynamic batch at c=64).
FLOPs are counted on real tokens (21.2 MFLOP per token plus attention's 2 x 2 x L x 384 per layer).
The engines alternate batch by batch, so the machine's load falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
LAYERS, HIDDEN, FFN = 6, 384, 1536
NAMES = ("input_ids", "attention_mask", "token_type_ids")


def text_flop(length: int) -> float:
    return length * (LAYERS * 2 * (4 * HIDDEN**2 + 2 * HIDDEN * FFN) + LAYERS * 2 * 2 * length * HIDDEN)


def corpus(version_dir: Path, short: bool) -> list[list[int]]:
    from tokenizers import BertWordPieceTokenizer

    tokenizer = BertWordPieceTokenizer(str(version_dir / "vocab.txt"), lowercase=True)
    texts = [t for t in (ROOT / "toolkit/bench/data/sentences.txt").read_text().splitlines() if t]
    if short:
        texts = [t for t in texts if 8 <= len(t.split()) <= 16]
    return [tokenizer.encode(t).ids[:256] for t in texts]


def feed(texts: list[list[int]]) -> dict[str, np.ndarray]:
    width = max(map(len, texts))
    ids = np.zeros((len(texts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, t in enumerate(texts):
        ids[row, :len(t)], mask[row, :len(t)] = t, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def batch_sets(texts: list[list[int]]) -> dict[str, list[list[list[int]]]]:
    ordered = sorted(texts, key=len)
    sorted16 = [ordered[s:s + 16] for s in range(0, len(ordered) - 15, 16)]
    order = np.random.default_rng(0).permutation(len(texts))
    random8 = []
    for s in range(0, len(order) - 31, 32):
        group = sorted((texts[i] for i in order[s:s + 32]), key=len)
        random8 += [group[k:k + 8] for k in range(0, 32, 8)]
    return {"sorted 16 (bulk)": sorted16, "random 32 as 4 x 8 (c=64)": random8}


def engines(model: Path, threads: int) -> dict:
    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    compiled = ov.Core().compile_model(str(model), "CPU", {
        "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return {
        f"onnxruntime {ort.__version__}": lambda f: session.run(None, {k: v for k, v in f.items() if k in inputs}),
        f"openvino {ov.__version__.split('-')[0]}": lambda f: list(
            request.infer({k: v for k, v in f.items() if k in inputs}).values()),
    }


def matmul_model(m: int, k: int, n: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, (m, k))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, (m, n))], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def matmul_peaks(threads: int, seconds: float, tmp: Path) -> dict[str, float]:
    """Each engine's best GFLOP per CPU second at MiniLM's shapes."""
    best: dict[str, float] = {}
    for m, k, n in ((640, 384, 384), (640, 384, 1536), (640, 1536, 384)):
        path = tmp / f"matmul-{m}x{k}x{n}.onnx"
        path.write_bytes(matmul_model(m, k, n))
        runs = engines(path, threads)
        x = {"x": np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)}
        for name, run in runs.items():
            for _ in range(5):
                run(x)
            deadline = time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                start = time.process_time()
                for _ in range(10):
                    run(x)
                spent = time.process_time() - start
                if spent > 0:
                    best[name] = max(best.get(name, 0.0), 10 * 2 * m * k * n / spent / 1e9)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bert-dir", type=Path, default=ROOT / "model_repository/bert/1")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=20.0, help="per engine, batch set and workload")
    parser.add_argument("--out", type=Path, default=ROOT / "build/bench/routes/engine.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    peaks = matmul_peaks(args.threads, 3.0, args.out.parent)
    roof = max(peaks.values())
    runs = engines(args.bert_dir / "model.onnx", args.threads)
    result: dict = {"threads": args.threads, "clock": "process CPU time", "matmul_gflop_per_cpu_s": peaks,
                    "roof": roof, "points": []}
    print("MatMul per CPU second:", ", ".join(f"{n} {v:.1f}" for n, v in peaks.items()))
    for workload in ("documentation", "short"):
        texts = corpus(args.bert_dir, workload == "short")
        for label, batches in batch_sets(texts).items():
            feeds = [(feed(b), sum(text_flop(len(t)) for t in b)) for b in batches]
            first = {n: run(feeds[0][0])[0] for n, run in runs.items()}
            a, b = first.values()
            spent = dict.fromkeys(runs, 0.0)
            flop, i, deadline = 0.0, 0, time.perf_counter() + args.seconds * len(runs)
            while time.perf_counter() < deadline or i < 8:
                f, cost = feeds[i % len(feeds)]
                for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                    start = time.process_time()
                    runs[name](f)
                    spent[name] += time.process_time() - start
                flop += cost
                i += 1
            point = {"workload": workload, "batches": label, "runs": i,
                     "max_abs_diff": float(np.abs(a - b).max()),
                     "gflop_per_cpu_s": {n: flop / s / 1e9 for n, s in spent.items()}}
            point["fraction_of_roof"] = {n: v / roof for n, v in point["gflop_per_cpu_s"].items()}
            result["points"].append(point)
            print(f"{workload:13s} {label:26s} " + "  ".join(
                f"{n}: {v:.1f} GFLOP/cpu-s ({v / roof:.3f})" for n, v in point["gflop_per_cpu_s"].items())
                + f"  max|diff| {point['max_abs_diff']:.1e}", flush=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
