"""Peer server: mosec (Rust HTTP front + Python workers with dynamic batching) on the same ONNX files.

Runs in its own venv (requirements-mosec.txt); imports nothing from ``toolkit``.

    python mosec_server.py --workload embedding --model-dir model_repository/bert/1 \\
        --address 127.0.0.1 --port 9400 [--max-batch-size 16] [--max-wait-ms 5]

    POST /embedding {"texts": ["...", ...]}        -> {"embeddings": [[384 floats], ...]}
    POST /mobile    {"images": ["<base64>", ...]}  -> {"embeddings": [[1280 floats], ...]}
    GET  /          200 "MOSEC service" (the Rust front only: it answers before the workers load)

Written the way a competent mosec user writes it:
- one route per workload through ``Server.register_runtime`` (mosec >= 0.8 routes), each served by
  one single-stage Python worker with mosec's dynamic batching: the Rust front collects up to
  ``max_batch_size`` requests or waits ``max_wait_time`` ms, then hands them to ``forward`` as a
  list. ``--workload`` chooses which routes to start (default: both); the benchmark starts only the
  measured one, as it does for every other contender.
- a request holds 1 to 64 items (the bulk limit the other servers apply). ``forward`` flattens the
  batch's items, runs them through the model in chunks of at most 64 items (texts sorted by token
  length first, so a chunk pads to similar lengths), and splits the rows back per request.
- embedding: ``tokenizers.BertWordPieceTokenizer`` on the exported vocab.txt (lower-case, accents
  stripped as BertTokenizerFast does), truncated at 256 tokens (all-MiniLM-L6-v2's max_seq_length),
  onnxruntime, attention-masked mean pooling, L2 normalisation.
- mobile: Pillow decode, convert RGB, resize to 224x224 BILINEAR, x / 127.5 - 1 (NHWC float32),
  onnxruntime. Images are decoded in ``deserialize`` (per request, in the same worker process).
- onnxruntime: intra-op threads = all cores (the worker is the only thing computing), graph
  optimisations on, as a user leaves them.
- JSON through msgspec (a mosec dependency): the stock ``json.dumps(indent=2)`` of the default
  serializer costs more than the model for 64 x 384 floats.
- mosec applies an error in ``forward`` to every request of the batch (its coordinator sends the
  same status to all); malformed input is therefore rejected in ``deserialize`` (422), per request.

Tuning: one quick measurement on this 2-core machine (closed loop, 1-text requests from the corpus,
5 s per point, another job sharing the CPU, so differences under ~20% are noise):

    max_batch_size / max_wait_time   1 client: req/s, p99     16 clients: req/s, p50, p99
    16 / 5 ms                        74, 31 ms                183, 76 ms, 327 ms
    32 / 5 ms                        80, 28 ms                143, 86 ms, 412 ms
    32 / 10 ms                       84, 26 ms                176, 76 ms, 254 ms
    64 / 5 ms                        82, 26 ms                163, 87 ms, 262 ms

Chosen: 16 and 5 ms. The benchmark's closed loop never has more than 16 requests outstanding, so a
cap above 16 never fills; 5 ms keeps the 1-client latency within noise of the longer waits.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import os
import sys
from pathlib import Path

import msgspec
import numpy as np
from mosec import Runtime, Server, ValidationError, Worker

MAX_ITEMS = 64
CHUNK = 64
MAX_SEQ_LENGTH = 256
IMAGE_SIZE = 224
ENV_BERT, ENV_MOBILENET = "PEER_MOSEC_BERT_DIR", "PEER_MOSEC_MOBILENET_DIR"


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _items(data: bytes, field: str) -> list:
    try:
        body = msgspec.json.decode(data)
    except msgspec.DecodeError as e:
        raise ValidationError(f"body is not JSON: {e}") from None
    items = body.get(field) if isinstance(body, dict) else None
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise ValidationError(f"expected {{{field!r}: [1 to {MAX_ITEMS} items]}}")
    if not all(isinstance(item, str) for item in items):
        raise ValidationError(f"every item of {field!r} must be a string")
    return items


def _answer(vectors: np.ndarray) -> bytes:
    return msgspec.json.encode({"embeddings": vectors.tolist()})


def _split(rows: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(counts)[:-1])


class Embedding(Worker):
    """Texts -> WordPiece -> BERT (ONNX) -> masked mean -> L2, on a dynamic batch of requests."""

    def __init__(self) -> None:
        super().__init__()
        from tokenizers import BertWordPieceTokenizer

        model_dir = Path(os.environ[ENV_BERT])
        self.tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)
        self.tokenizer.enable_truncation(MAX_SEQ_LENGTH)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
        self.session = _session(model_dir / "model.onnx")

    def deserialize(self, data: bytes) -> list[str]:
        texts = _items(data, "texts")
        if any(not t.strip() for t in texts):
            raise ValidationError("a text is empty")
        return texts

    def serialize(self, data: np.ndarray) -> bytes:
        return _answer(data)

    def embed(self, texts: list[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        hidden = self.session.run(["last_hidden_state"], {
            "input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def forward(self, data: list[list[str]]) -> list[np.ndarray]:
        texts = [t for request in data for t in request]
        lengths = [len(e.ids) for e in self.tokenizer.encode_batch(texts)] if len(texts) > CHUNK else None
        order = np.argsort(lengths, kind="stable") if lengths else np.arange(len(texts))
        rows = np.empty((len(texts), 0), dtype=np.float32)
        for start in range(0, len(texts), CHUNK):
            part = order[start:start + CHUNK]
            vectors = self.embed([texts[i] for i in part])
            if rows.shape[1] == 0:
                rows = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            rows[part] = vectors
        return _split(rows, [len(request) for request in data])


def _pixels(payload: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(payload)) as image:
        image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


class Mobile(Worker):
    """Base64 images -> Pillow preprocessing -> MobileNetV2 (ONNX), on a dynamic batch of requests."""

    def __init__(self) -> None:
        super().__init__()
        self.session = _session(Path(os.environ[ENV_MOBILENET]) / "model.onnx")

    def deserialize(self, data: bytes) -> np.ndarray:
        pixels = []
        for item in _items(data, "images"):
            try:
                pixels.append(_pixels(base64.b64decode(item, validate=True)))
            except (binascii.Error, ValueError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
                raise ValidationError(f"not a decodable base64 image: {e}") from None
        return np.stack(pixels)

    def serialize(self, data: np.ndarray) -> bytes:
        return _answer(data)

    def forward(self, data: list[np.ndarray]) -> list[np.ndarray]:
        images = np.concatenate(data)
        rows = [self.session.run(["embedding"], {"image": images[i:i + CHUNK]})[0]
                for i in range(0, len(images), CHUNK)]
        return _split(np.concatenate(rows), [len(request) for request in data])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["embedding", "mobile", "both"], default="both")
    parser.add_argument("--model-dir", type=Path, help="the workload's version folder (one workload only)")
    parser.add_argument("--bert-dir", type=Path)
    parser.add_argument("--mobilenet-dir", type=Path)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=int, default=5)
    # mosec reads its own flags (--address, --port, --timeout, ...) from sys.argv: leave them there.
    args, _ = parser.parse_known_args(argv)
    workloads = ["embedding", "mobile"] if args.workload == "both" else [args.workload]
    dirs = {"embedding": args.bert_dir, "mobile": args.mobilenet_dir}
    if args.model_dir is not None:
        if len(workloads) != 1:
            parser.error("--model-dir needs one --workload; use --bert-dir and --mobilenet-dir for both")
        dirs[workloads[0]] = args.model_dir
    for name in workloads:
        if dirs[name] is None or not (dirs[name] / "model.onnx").is_file():
            flag = "--bert-dir" if name == "embedding" else "--mobilenet-dir"
            parser.error(f"no model.onnx for {name}: give --model-dir or {flag}")
    # The workers are spawned processes: they find their model through the inherited environment.
    if "embedding" in workloads:
        os.environ[ENV_BERT] = str(dirs["embedding"].resolve())
    if "mobile" in workloads:
        os.environ[ENV_MOBILENET] = str(dirs["mobile"].resolve())
    workers = {"embedding": Embedding, "mobile": Mobile}
    server = Server()
    server.register_runtime({f"/{name}": [Runtime(workers[name], num=1, max_batch_size=args.max_batch_size,
                                                   max_wait_time=args.max_wait_ms, timeout=30)]
                             for name in workloads})
    server.run()


if __name__ == "__main__":
    sys.exit(main())
