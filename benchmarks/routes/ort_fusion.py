"""Route 1 of BENCHMARKS.md's "Routes to the roofline": onnxruntime's transformer optimizer on a
`toolkit export bert` folder, checked against it on mixed-length padded batches.

    pip install sympy        # the optimizer's shape inference needs it; the toolkit does not
    .venv/bin/python benchmarks/routes/ort_fusion.py model_repository/bert/1 build/bench/routes/fused/1

Writes OUT_DIR (model.onnx with the fused Attention, SkipLayerNormalization and BiasGelu contrib
ops; vocab.txt and export.json copied) and prints what fused and how far the fused model's outputs
are from the source's, at the served optimization level and with optimizations off. `--mask index`
uses the optimizer's default 1-D mask index (sequence lengths, right padding assumed) instead of the
raw 0/1 mask, which keeps any mask a caller sends meaning what it means in the source.
"""

from __future__ import annotations

import argparse
import collections
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort


def fuse(source: Path, out: Path, raw_mask: bool) -> dict[str, int]:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_raw_attention_mask(raw_mask)
    optimized = optimize_model(str(source / "model.onnx"), model_type="bert", num_heads=12, hidden_size=384,
                               opt_level=0, optimization_options=options)
    out.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(out / "model.onnx"))
    for name in ("vocab.txt", "export.json"):
        shutil.copyfile(source / name, out / name)
    return {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}


def session(path: Path, level: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(source: Path, fused: Path, seed: int = 0) -> None:
    """Mixed-length padded batches: the fused model's token states and mean-pooled vectors against
    the source's, on real tokens only."""
    rng = np.random.default_rng(seed)
    reference = session(source / "model.onnx", "ORT_ENABLE_ALL")
    for level in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
        candidate = session(fused / "model.onnx", level)
        worst_diff, worst_cos = 0.0, 1.0
        for batch, longest in ((1, 9), (5, 31), (8, 64), (16, 128)):
            lengths = rng.integers(2, longest + 1, batch)
            lengths[0] = longest
            mask = (np.arange(longest)[None] < lengths[:, None]).astype(np.int64)
            ids = np.where(mask, rng.integers(1000, 29000, (batch, longest)), 0).astype(np.int64)
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
            want = reference.run(["last_hidden_state"], feed)[0]
            got = candidate.run(["last_hidden_state"], feed)[0]
            real = mask.astype(bool)
            worst_diff = max(worst_diff, float(np.abs(want - got)[real].max()))

            def pooled(h: np.ndarray, mask: np.ndarray = mask) -> np.ndarray:
                e = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
                return e / np.linalg.norm(e, axis=1, keepdims=True)

            worst_cos = min(worst_cos, float((pooled(want) * pooled(got)).sum(1).min()))
        print(f"{level:16s} max |diff| on real tokens {worst_diff:.2e}, min cosine of pooled vectors {worst_cos:.7f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mask", choices=["raw", "index"], default="raw")
    args = parser.parse_args()
    fused = fuse(args.source, args.out, args.mask == "raw")
    print("fused:", fused)
    import onnx

    ops = collections.Counter(n.op_type for n in onnx.load(str(args.out / "model.onnx")).graph.node)
    print("ops:", dict(ops.most_common()))
    compare(args.source, args.out)


if __name__ == "__main__":
    main()
