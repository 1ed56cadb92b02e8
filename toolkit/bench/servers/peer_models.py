"""The models both peer servers run (mosec_server.py, ray_server.py): one copy, so they compute alike.

Runs in the peers' own venvs and imports nothing from ``toolkit``: each server imports it as a
sibling module (its folder is the script's, first on ``sys.path``). Ray pickles the deployment
class, so ray_server.py registers this module to be pickled by value for its workers.

- text: ``tokenizers.BertWordPieceTokenizer`` on the exported vocab.txt (lower-case, accents
  stripped as BertTokenizerFast does), truncated at 256 tokens (all-MiniLM-L6-v2's max_seq_length),
  onnxruntime, attention-masked mean pooling, L2 normalisation. More than 64 texts are sorted by
  token length and run in chunks of 64, so a chunk pads to similar lengths.
- images: Pillow decode, RGB, 224x224 BILINEAR, x / 127.5 - 1 (NHWC float32), onnxruntime in
  chunks of 64.
- onnxruntime: intra-op threads = all cores (the peer's worker is the only thing computing), graph
  optimisations on, as a user leaves them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

MAX_ITEMS = 64  # items per request, the bulk limit every server applies
CHUNK = 64
MAX_SEQ_LENGTH = 256
IMAGE_SIZE = 224


def session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def split(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """A batch's rows back per request, ``counts[i]`` rows each."""
    return np.split(rows, np.cumsum(counts)[:-1])


class TextModel:
    """Texts -> WordPiece -> BERT (ONNX) -> masked mean -> L2: ``[n, 384]`` float32."""

    def __init__(self, model_dir: Path):
        from tokenizers import BertWordPieceTokenizer

        self.tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)
        self.tokenizer.enable_truncation(MAX_SEQ_LENGTH)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.session = session(model_dir / "model.onnx")

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        hidden = self.session.run(["last_hidden_state"], {
            "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def __call__(self, texts: list[str]) -> np.ndarray:
        if len(texts) <= CHUNK:
            return self.embed(texts)
        order = np.argsort([len(e.ids) for e in self.tokenizer.encode_batch(texts)], kind="stable")
        rows = None
        for start in range(0, len(texts), CHUNK):
            part = order[start:start + CHUNK]
            vectors = self.embed([texts[i] for i in part])
            if rows is None:
                rows = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            rows[part] = vectors
        return rows


class ImageModel:
    """Decoded pixels ``[n, 224, 224, 3]`` -> MobileNetV2 (ONNX): ``[n, 1280]`` float32."""

    def __init__(self, model_dir: Path):
        self.session = session(model_dir / "model.onnx")

    @staticmethod
    def pixels(payload: bytes) -> np.ndarray:
        """One encoded image as the model's input; PIL's errors (OSError, ValueError) pass through."""
        from PIL import Image

        with Image.open(io.BytesIO(payload)) as image:
            image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
            return np.asarray(image, dtype=np.float32) / 127.5 - 1.0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return np.concatenate([self.session.run(["embedding"], {"image": pixels[i:i + CHUNK]})[0]
                               for i in range(0, len(pixels), CHUNK)])
