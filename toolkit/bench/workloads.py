"""What the benchmark sends: the workloads (embedding, short, mobile) and their payloads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import BenchError


@dataclass(frozen=True)
class Workload:
    name: str  # embedding | short | mobile
    model: str  # embedding | mobile: the model / route name every server uses
    model_dir: Path  # version folder of the ONNX model (bert/1 or mobilenet/1)
    input_name: str
    json_field: str
    steps: tuple[str, ...]  # the toolkit's models behind the ensemble, for the server-side split
    int8_dir: Path | None = None  # `toolkit export bert --quantize int8`: the toolkit-int8 contender

    @property
    def max_items(self) -> int:
        """Items one request may hold: the served ensemble's max_batch_size (embedding 64, mobile 32)."""
        return 32 if self.model == "mobile" else 64

    def payloads(self) -> list[bytes]:
        from toolkit.bench.pipelines import load_corpus, make_images

        if self.model == "mobile":
            return make_images(64)
        texts = load_corpus()
        if self.name == "short":  # one short sentence per request, as a chat or search box sends
            texts = [t for t in texts if SHORT_WORDS[0] <= len(t.split()) <= SHORT_WORDS[1]]
        return [t.encode("utf-8") for t in texts]


SHORT_WORDS = (8, 16)
WORKLOADS = ("embedding", "short", "mobile")


def workload(name: str, model_dir: Path, int8_dir: Path | None = None) -> Workload:
    if name in ("embedding", "short"):
        return Workload(name, "embedding", model_dir, "TEXT", "texts", ("tokenizer", "bert", "pooling"), int8_dir)
    if name == "mobile":
        return Workload(name, "mobile", model_dir, "IMAGE", "images", ("preprocess", "mobilenet"))
    raise BenchError(f"unknown workload {name!r}: use {', '.join(WORKLOADS)}")
