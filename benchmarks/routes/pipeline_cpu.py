"""Where a served text's CPU goes besides BERT: CPU milliseconds per text of BERT alone (the ONNX hook
through `run_batch`) and of the whole fused pipeline (tokenizer, BERT, pooling: the hooks
`execution: fused` runs), in process, one onnxruntime thread, the same random groups a dynamic batch
holds. Set beside served.py's server CPU per text, the rest is Triton, gRPC and the stub hand-offs.

    .venv/bin/python benchmarks/routes/pipeline_cpu.py FUSED_VERSION_DIR [--rounds 3]

FUSED_VERSION_DIR is the version folder of an `execution: fused` model that gen-repo wrote.
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
sys.path.insert(0, str(Path(__file__).parent))

from inprocess import bert_layout, encode, groups  # noqa: E402

from toolkit.bench.pipelines import load_corpus  # noqa: E402
from toolkit.bench.workloads import SHORT_WORDS  # noqa: E402
from toolkit.runtime.batching import run_batch  # noqa: E402
from toolkit.runtime.fused_runner import FusedPipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("fused_dir", type=Path)
    parser.add_argument("--plan", default="fused.json", help="the plan file gen-repo wrote beside model.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "bench" / "routes" / "pipeline_cpu.json")
    args = parser.parse_args()
    plan = json.loads((args.fused_dir / args.plan).read_text())
    bert_dir = args.fused_dir / next(step["folder"] for step in plan["steps"] if step["model"] == "bert")
    # two instances' share of the cores: one onnxruntime thread, what adaptive gives a run under load
    pipeline = FusedPipeline.load(args.fused_dir, args.plan, instance_count=2)
    bert = next(s for s in pipeline.steps if s.model == "bert")
    corpus = load_corpus()
    texts = {"doc": corpus, "short": [t for t in corpus if SHORT_WORDS[0] <= len(t.split()) <= SHORT_WORDS[1]]}
    layout = bert_layout(bert.layout.bucket_cost)
    results: dict = {}
    for round_ in range(args.rounds):
        for name, items in texts.items():
            encoded = encode(items, bert_dir)
            raw = [{"TEXT": np.array([[t.encode("utf-8")]], dtype=object)} for t in items]
            for size in (8, 32):
                order = groups(list(range(len(items))), size, round_)
                for what in ("bert", "pipeline"):
                    start = time.process_time()
                    for group in order:
                        if what == "bert":
                            run_batch(bert.hook, [encoded[i] for i in group], layout)
                        else:
                            pipeline.run([raw[i] for i in group])
                    ms = 1000 * (time.process_time() - start) / len(items)
                    results.setdefault(f"{name}/random{size}/{what}", []).append(ms)
                    print(f"round {round_} {name:5s} random{size:<2d} {what:8s} {ms:6.2f} CPU ms/text", flush=True)
    print({k: round(statistics.median(v), 2) for k, v in results.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
