"""Text hooks for BERT-style embedding models: WordPiece tokenisation and pooling.

The two hooks are the Python steps around an exported BERT encoder in an ensemble such as go-infer's
``/api/embedding``::

    TEXT --WordPieceTokenizer--> input_ids, attention_mask, token_type_ids --BERT (ONNX)-->
    last_hidden_state (+ pooler_output) --MeanPooling(+ attention_mask)--> embedding

Together they reproduce sentence-transformers' all-MiniLM-L6-v2 recipe: HF ``BertTokenizerFast``
tokenisation truncated to ``max_seq_length`` tokens (including [CLS] and [SEP]), attention-masked
mean of the token embeddings, L2 normalisation.

WordPieceTokenizer
    input   TEXT             BYTES  [n, 1]    UTF-8 texts (``str`` elements are accepted too)
    outputs input_ids        INT64  [n, seq]  seq = longest encoding in the dynamic batch,
            attention_mask   INT64  [n, seq]  rows right-padded with [PAD]'s id / 0 / 0
            token_type_ids   INT64  [n, seq]
    parameters
      vocab           WordPiece vocabulary, relative to the model's version folder ("vocab.txt")
      lower_case      "true"/"false"; default: ``do_lower_case`` of ``export.json``, else of
                      ``tokenizer_config.json`` in the version folder, else true. Accents are
                      stripped exactly when lower-casing (BertTokenizerFast's ``strip_accents=None``).
      max_seq_length  tokens per text including [CLS]/[SEP]; default: ``max_seq_length`` of
                      ``export.json``, else 256 (all-MiniLM-L6-v2). Longer texts are truncated.
      max_text_bytes  largest accepted UTF-8 text (65536)

MeanPooling
    inputs  last_hidden_state FP32  [n, seq, hidden]  (modes mean, cls)
            attention_mask    INT64 [n, seq]          (mode mean)
            pooler_output     FP32  [n, hidden]       (mode pooler)
    output  embedding         FP32  [n, hidden]
    parameters
      mode       "mean" (default): sum(h * mask) / max(sum(mask), 1e-9), as sentence-transformers;
                 "cls": the first token's hidden state; "pooler": ``pooler_output`` as it comes
                 (Google BERT's tanh(dense(CLS))). Wire only the inputs the mode reads.
      normalize  "true"/"false": divide by max(L2 norm, 1e-12) as torch.nn.functional.normalize.
                 Default true for mean and cls, false for pooler (the pooler output passes unchanged).

Error codes sent by ``api_entry`` (the client sees ``[code] message``):
    1001  a text is empty or only whitespace
    1002  a text is not valid UTF-8
    1003  a text is longer than ``max_text_bytes`` (65536)
    1004  TEXT is missing, not shaped [n, 1] with n >= 1, or holds something other than bytes/str
    1005  the request's texts together are longer than ``max_request_bytes`` (262144): the budget that
          keeps one request from holding the tokenizer while others wait
    1201  a tensor the pooling mode needs is missing
    1202  pooling inputs have the wrong rank or disagree in batch or sequence length
    1203  last_hidden_state / pooler_output holds NaN or infinity (finite values as large as float32's
          3.4e38 pool to a finite, unit-norm embedding: sums overflow into float64, norms are scaled)
    1204  attention_mask holds values other than 0 and 1

Configuration mistakes (a missing vocabulary, an unknown mode) raise ``ValueError`` from ``init``
so the model fails to load instead of failing every request.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.builtins import column_tensor, parse_bool, parse_int
from toolkit.runtime.hooks import Hook, HookContext, HookError

EMPTY_TEXT = 1001
TEXT_NOT_UTF8 = 1002
TEXT_TOO_LONG = 1003
BAD_TEXT_TENSOR = 1004
REQUEST_TEXT_TOO_LONG = 1005
POOLING_INPUT_MISSING = 1201
POOLING_SHAPE_MISMATCH = 1202
POOLING_NOT_FINITE = 1203
POOLING_BAD_MASK = 1204

DEFAULT_MAX_SEQ_LENGTH = 256
DEFAULT_MAX_TEXT_BYTES = 65536
DEFAULT_MAX_REQUEST_BYTES = 256 * 1024
BERT_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def build_wordpiece_tokenizer(vocab_path: Path, lower_case: bool, max_seq_length: int):
    """A ``tokenizers.Tokenizer`` configured as HF ``BertTokenizerFast`` builds it from a vocab.txt.

    Special tokens are registered as added tokens (so a literal "[SEP]" in a text maps to its id,
    as in HF), the template is ``[CLS] $A [SEP]`` and truncation keeps room for both specials.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordPiece
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    from tokenizers.processors import TemplateProcessing

    if not vocab_path.is_file():
        raise ValueError(f"WordPiece vocabulary not found: {vocab_path}")
    vocab = WordPiece.read_file(str(vocab_path))
    for token in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"):
        if token not in vocab:
            raise ValueError(f"{vocab_path} has no {token} token")

    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.add_special_tokens([token for token in BERT_SPECIAL_TOKENS if token in vocab])
    tokenizer.normalizer = BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lower_case
    )
    tokenizer.pre_tokenizer = BertPreTokenizer()
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.enable_truncation(max_length=max_seq_length)
    tokenizer.enable_padding(pad_id=vocab["[PAD]"], pad_type_id=0, pad_token="[PAD]")
    return tokenizer


class WordPieceTokenizer(Hook):
    """TEXT -> BERT inputs, one ``encode_batch`` per dynamic batch (see the module docstring)."""

    api_path = "embedding"

    def init(self, ctx: HookContext) -> None:
        params = ctx.parameters
        model_dir = Path(ctx.model_dir)
        export = _read_json(model_dir / "export.json")
        if "lower_case" in params:
            lower_case = parse_bool(params["lower_case"], "lower_case")
        elif "do_lower_case" in export:
            lower_case = parse_bool(export["do_lower_case"], "export.json do_lower_case")
        else:
            tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
            lower_case = parse_bool(tokenizer_config.get("do_lower_case", True), "do_lower_case")
        self.lower_case = lower_case
        self.max_seq_length = parse_int(
            params.get("max_seq_length", export.get("max_seq_length", DEFAULT_MAX_SEQ_LENGTH)),
            "max_seq_length", minimum=2,
        )
        self.max_text_bytes = parse_int(params.get("max_text_bytes", DEFAULT_MAX_TEXT_BYTES),
                                        "max_text_bytes", minimum=1)
        self.max_request_bytes = parse_int(params.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
                                           "max_request_bytes", minimum=1)
        self.tokenizer = build_wordpiece_tokenizer(
            model_dir / params.get("vocab", "vocab.txt"), lower_case, self.max_seq_length
        )
        # encode_batch_fast skips computing character offsets we never use (tokenizers >= 0.21).
        self._encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate every text and tokenize the request on its own, so it keeps its own length: the
        adapter batches requests of equal length into one ``infer`` call and runs the others apart,
        and the BERT step after this one can bucket them by length. (Tokenizing a whole dynamic
        batch at once would pad every text to the batch's longest.)"""
        texts = column_tensor(request, "TEXT", BAD_TEXT_TENSOR)
        total = sum(len(t) if isinstance(t, bytes | str) else 0 for t in texts[:, 0])
        if total > self.max_request_bytes:
            raise HookError(REQUEST_TEXT_TOO_LONG, f"the request's {texts.shape[0]} texts hold {total} bytes, more "
                                                   f"than the limit of {self.max_request_bytes} per request; "
                                                   "send them in smaller requests")
        decoded = [self._checked_text(row, item) for row, item in enumerate(texts[:, 0])]
        return {**request, **self._encode(decoded)}

    def _checked_text(self, row: int, item: Any) -> str:
        if isinstance(item, bytes):
            if len(item) > self.max_text_bytes:
                raise HookError(TEXT_TOO_LONG, f"TEXT[{row}] has {len(item)} bytes, "
                                               f"more than the limit of {self.max_text_bytes}")
            try:
                text = item.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HookError(TEXT_NOT_UTF8, f"TEXT[{row}] is not valid UTF-8: {e.reason} "
                                               f"at byte {e.start}") from None
        elif isinstance(item, str):  # in-process callers; Triton always delivers bytes
            text = item
            try:
                size = len(text.encode("utf-8"))  # also refuses lone surrogates tokenizers would choke on
            except UnicodeEncodeError as e:
                raise HookError(TEXT_NOT_UTF8, f"TEXT[{row}] is not valid UTF-8: {e.reason}") from None
            if size > self.max_text_bytes:
                raise HookError(TEXT_TOO_LONG, f"TEXT[{row}] has {size} bytes, "
                                               f"more than the limit of {self.max_text_bytes}")
        else:
            raise HookError(BAD_TEXT_TENSOR, f"TEXT[{row}] must be bytes or str, got {type(item).__name__}")
        if not text.strip():
            raise HookError(EMPTY_TEXT, f"TEXT[{row}] is empty or only whitespace")
        return text

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "input_ids" in batch:  # tokenized by api_entry
            return {name: batch[name] for name in ("input_ids", "attention_mask", "token_type_ids")}
        texts = batch["TEXT"].reshape(-1).tolist()  # api_entry bypassed: decode and tokenize here
        return self._encode([text.decode("utf-8") if isinstance(text, bytes) else text for text in texts])

    def _encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._encode_batch(texts)
        input_ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        attention_mask = np.array([encoding.attention_mask for encoding in encodings], dtype=np.int64)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            # Single sequences are all segment 0 (the template's type ids), padding included.
            "token_type_ids": np.zeros_like(input_ids),
        }


class MeanPooling(Hook):
    """Token embeddings -> one sentence embedding per text (see the module docstring)."""

    MODES = ("mean", "cls", "pooler")

    def init(self, ctx: HookContext) -> None:
        mode = str(ctx.parameters.get("mode", "mean")).strip().lower()
        if mode not in self.MODES:
            raise ValueError(f"parameter 'mode' must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode
        self.normalize = parse_bool(ctx.parameters.get("normalize", mode != "pooler"), "normalize")

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_inputs(request)
        return request

    def _check_inputs(self, tensors: dict[str, np.ndarray]) -> None:
        if self.mode == "pooler":
            pooled = self._required(tensors, "pooler_output")
            if pooled.ndim != 2:
                raise HookError(POOLING_SHAPE_MISMATCH,
                                f"pooler_output must be [n, hidden], got shape {list(pooled.shape)}")
            if pooled.dtype.kind == "f" and not np.isfinite(pooled).all():
                raise HookError(POOLING_NOT_FINITE, "pooler_output holds NaN or infinity")
            return
        hidden = self._required(tensors, "last_hidden_state")
        if hidden.ndim != 3 or hidden.shape[1] < 1:
            raise HookError(POOLING_SHAPE_MISMATCH,
                            f"last_hidden_state must be [n, seq >= 1, hidden], got shape {list(hidden.shape)}")
        if self.mode == "mean":
            mask = self._required(tensors, "attention_mask")
            if mask.shape != hidden.shape[:2]:
                raise HookError(POOLING_SHAPE_MISMATCH,
                                f"attention_mask shape {list(mask.shape)} does not match last_hidden_state "
                                f"shape {list(hidden.shape)} in [n, seq]")
            if mask.size and (mask.min() < 0 or mask.max() > 1):
                raise HookError(POOLING_BAD_MASK, "attention_mask must hold only 0 and 1")
        if hidden.dtype.kind == "f" and not np.isfinite(hidden).all():
            raise HookError(POOLING_NOT_FINITE, "last_hidden_state holds NaN or infinity")

    @staticmethod
    def _required(tensors: dict[str, np.ndarray], name: str) -> np.ndarray:
        if name not in tensors:
            raise HookError(POOLING_INPUT_MISSING, f"pooling needs input tensor {name!r}")
        return np.asarray(tensors[name])

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_inputs(batch)  # cheap, and catches a mis-padded batch before numpy broadcasts it
        if self.mode == "pooler":
            pooled = np.asarray(batch["pooler_output"], dtype=np.float32)
        elif self.mode == "cls":
            pooled = np.asarray(batch["last_hidden_state"], dtype=np.float32)[:, 0, :]
        else:
            pooled = masked_mean(np.asarray(batch["last_hidden_state"], dtype=np.float32),
                                 np.asarray(batch["attention_mask"]))
        if self.normalize:
            pooled = l2_normalize(pooled)
        pooled = np.ascontiguousarray(pooled, dtype=np.float32)
        if not np.isfinite(pooled).all():  # the computation stays finite; never send what it did not
            raise HookError(POOLING_NOT_FINITE, "the embedding came out non-finite (NaN or infinity)")
        return {"embedding": pooled}


def masked_mean(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling: padding tokens count for nothing, counts clamp at 1e-9.

    Plain ufuncs, not ``matmul``: a BLAS call wakes OpenBLAS's thread pool, whose threads then spin
    for milliseconds after a microsecond of work. In a busy server that was 3.8 ms of CPU per request,
    a fifth of the machine (measured in the embedding benchmark).

    A row whose float32 sum overflows (finite states near 3e38) is summed again in float64: a mean of
    finite float32 values is a finite float32, so the result is never infinite.
    """
    weights = mask.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        summed = (hidden * weights[:, :, None]).sum(axis=1)
    counts = np.maximum(weights.sum(axis=1, keepdims=True), np.float32(1e-9))
    mean = summed / counts
    overflowed = ~np.isfinite(mean).all(axis=1)
    if overflowed.any():
        wide = (hidden[overflowed].astype(np.float64) * weights[overflowed][:, :, None]).sum(axis=1)
        mean[overflowed] = (wide / counts[overflowed]).astype(np.float32)
    return mean


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """torch.nn.functional.normalize(p=2, dim=1): x / max(||x||, 1e-12).

    A row whose norm overflows float32 (its squares pass 3.4e38: values past ~1e19) is scaled by its
    largest magnitude first; dividing by the infinite norm would silently give zeros."""
    with np.errstate(over="ignore"):
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    overflowed = ~np.isfinite(norms[:, 0])
    if overflowed.any():
        rows = vectors[overflowed] / np.abs(vectors[overflowed]).max(axis=1, keepdims=True)
        vectors, norms = vectors.copy(), norms.copy()
        vectors[overflowed] = rows
        norms[overflowed] = np.linalg.norm(rows, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))
