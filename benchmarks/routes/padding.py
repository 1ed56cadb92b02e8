"""How much the length buckets pad, and how many texts one onnxruntime call gets, when a dynamic
batch holds N random texts of the corpus (BENCHMARKS.md, "Routes to the roofline", route 2).

    .venv/bin/python benchmarks/routes/padding.py BERT_VERSION_DIR [--costs 0,2,4,8,16,32] [--groups 8,32]

Cost 0 pads every batch to its longest text (no buckets); otherwise the bucket DP of
`toolkit/runtime/batching.py` splits each batch as the served hook does with that `bucket_call_cost`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from inprocess import bert_layout, encode, groups  # noqa: E402

from toolkit.bench.pipelines import load_corpus  # noqa: E402
from toolkit.bench.workloads import SHORT_WORDS  # noqa: E402
from toolkit.runtime.batching import _Accepted, _buckets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("bert_dir", type=Path)
    parser.add_argument("--costs", default="0,2,4,8,16,32")
    parser.add_argument("--groups", default="8,32")
    args = parser.parse_args()
    corpus = load_corpus()
    short = [t for t in corpus if SHORT_WORDS[0] <= len(t.split()) <= SHORT_WORDS[1]]
    for name, texts in (("doc", corpus), ("short", short)):
        requests = encode(texts, args.bert_dir)
        lengths = np.array([r["input_ids"].shape[1] for r in requests])
        print(f"{name}: {len(texts)} texts, mean {lengths.mean():.1f} tokens")
        for cost in (float(c) for c in args.costs.split(",")):
            for size in (int(g) for g in args.groups.split(",")):
                real = padded = calls = 0
                for group in groups(requests, size, 0):
                    accepted = [_Accepted(i, r, 1) for i, r in enumerate(group)]
                    buckets = _buckets(accepted, bert_layout(cost)) if cost else [accepted]
                    calls += len(buckets)
                    padded += sum(max(a.inputs["input_ids"].shape[1] for a in b) * len(b) for b in buckets)
                    real += sum(a.inputs["input_ids"].shape[1] for a in accepted)
                print(f"  bucket_call_cost {cost:4g}, {size:2d} texts a batch: padded/real tokens {padded / real:.3f}, "
                      f"{len(requests) / calls:4.1f} texts per onnxruntime call")


if __name__ == "__main__":
    main()
