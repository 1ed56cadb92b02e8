"""The served pipelines, in process: the same hooks and ONNX files the ensembles run, with no server.

They are the benchmark's "limit" (baseline a) and the callables the other baselines serve, so every
contender computes exactly the same thing from the same files:

    embed = EmbeddingPipeline(Path("model_repository/bert/1"))
    vectors = embed(["a sentence", "another one"])          # [n, 384] float32

    mobile = MobilePipeline(Path("model_repository/mobilenet/1"))
    vectors = mobile([jpeg_bytes, png_bytes])                # [n, 1280] float32
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.builtins.image import ImagePreprocess
from toolkit.builtins.text import MeanPooling, WordPieceTokenizer
from toolkit.hooks import Hook, HookContext
from toolkit.runtime.onnx_hook import default_threads

DATA = Path(__file__).parent / "data"


def load_corpus() -> list[str]:
    """501 real English sentences of 5 to 58 words (from the Python standard library's docstrings)."""
    return [line for line in (DATA / "sentences.txt").read_text(encoding="utf-8").splitlines() if line]


def make_images(count: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Deterministic JPEG photos-alike (smooth gradients plus noise), ``size`` x ``size``."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    x = np.mgrid[0:size, 0:size][1] / size
    images = []
    for _ in range(count):
        base = np.stack([np.sin(x * rng.uniform(1, 8) + rng.uniform(0, 6)) for _ in range(3)], axis=-1)
        pixels = np.clip((base * 0.5 + 0.5) * 200 + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def text_tokenizer(bert_dir: Path, max_seq_length: int = 256) -> WordPieceTokenizer:
    """The tokenizer step's hook, as the `embedding` ensemble serves it for this BERT export."""
    tokenizer = WordPieceTokenizer()
    tokenizer.init(_context("tokenizer", bert_dir, max_seq_length=str(max_seq_length)))
    return tokenizer


def token_counts(bert_dir: Path, texts: list[str], max_seq_length: int = 256) -> list[int]:
    """Each text's tokens as served (the tokenizer step's WordPiece, [CLS]/[SEP], truncated): no padding."""
    tokenizer = text_tokenizer(bert_dir, max_seq_length)
    return [sum(encoding.attention_mask) for encoding in tokenizer.tokenizer.encode_batch(texts)]  # unpadded


def _context(name: str, model_dir: Path, **parameters: str) -> HookContext:
    return HookContext(model_name=name, model_version=1, model_dir=Path(model_dir), parameters=parameters)


def _session(path: Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or default_threads(1)
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(hook: Hook, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return hook.infer(hook.api_entry(request))


class EmbeddingPipeline:
    """Tokenize (WordPiece) -> BERT (onnxruntime) -> mean pooling + L2, on a list of texts."""

    def __init__(self, bert_dir: Path, *, threads: int | None = None, max_seq_length: int = 256):
        self.tokenizer = text_tokenizer(bert_dir, max_seq_length)
        self.pooling = MeanPooling()
        self.pooling.init(_context("pooling", bert_dir))
        self.session = _session(Path(bert_dir) / "model.onnx", threads)

    def token_count(self, text: str) -> int:
        """Tokens of ``text`` as served (with [CLS]/[SEP], truncated): the length batches sort by."""
        return len(self.tokenizer.tokenizer.encode(text).ids)

    def __call__(self, texts: list[str]) -> np.ndarray:
        encoded = _run(self.tokenizer, {"TEXT": np.array([[t.encode("utf-8")] for t in texts], dtype=object)})
        hidden = self.session.run(["last_hidden_state"], encoded)[0]
        return _run(self.pooling, {"last_hidden_state": hidden, "attention_mask": encoded["attention_mask"]})[
            "embedding"]


class MobilePipeline:
    """Decode + resize + normalise (Pillow) -> MobileNetV2 (onnxruntime), on encoded images."""

    def __init__(self, mobilenet_dir: Path, *, threads: int | None = None):
        self.preprocess = ImagePreprocess()
        self.preprocess.init(_context("preprocess", mobilenet_dir))
        self.session = _session(Path(mobilenet_dir) / "model.onnx", threads)

    def __call__(self, images: list[bytes]) -> np.ndarray:
        pixels = _run(self.preprocess, {"IMAGE": np.array([[b] for b in images], dtype=object)})["image"]
        return self.session.run(["embedding"], {"image": pixels})[0]
