"""Per-request budgets on the real server: one request of many huge images or long texts is refused
at once with its code, and a normal request sent meanwhile is answered; the internal models refuse
impossible inputs (token ids outside the vocabulary, NaN) with a code instead of a wrong answer."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from bounded import Background
from PIL import Image
from serving import raw_http_infer

from toolkit.client import TritonClient
from toolkit.errors import InferenceError

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def refused_while_a_normal_request_is_answered(server, model, tensor, hostile, normal):
    def send_normal():
        time.sleep(0.05)
        with TritonClient(server.grpc_url, protocol="grpc", timeout=20) as client:
            started = time.perf_counter()
            client.infer(model, {tensor: normal})
            return time.perf_counter() - started

    with Background(seconds=60, join_timeout=30, name="normal") as load:   # calls: 20 s at most
        normal_took = load.once(send_normal)
        with TritonClient(server.grpc_url, protocol="grpc", timeout=20) as client:
            started = time.perf_counter()
            with pytest.raises(InferenceError) as refused:
                client.infer(model, {tensor: hostile})
            took = time.perf_counter() - started
        assert load.until(normal_took.done.is_set, 30), "the normal request was not answered within 30s"
    return refused.value, took, normal_took.result()


def test_32_huge_pngs_in_one_request_are_1105_at_once_and_others_are_served(example_server):
    huge = png(6300, 6300)                                   # 39.7 MP, just under the per-image limit
    assert len(huge) < 200_000
    hostile = np.array([[huge]] * 32, dtype=object)
    error, took, normal_took = refused_while_a_normal_request_is_answered(
        example_server, "mobile", "IMAGE", hostile, np.array([[png(300, 200)]], dtype=object))
    assert error.code == 1105 and "megapixels" in str(error)
    assert took < 5 and normal_took < 5, (took, normal_took)   # decoding them all took ~13 s before
    print(f"\n32 x 39.7 MP refused in {took * 1000:.0f} ms; a normal image answered in {normal_took * 1000:.0f} ms")


def test_a_request_of_long_texts_is_1005_and_others_are_served(example_server):
    hostile = np.array([[("word " * 13_000).encode()]] * 16, dtype=object)      # 16 x 65 KB
    error, took, _ = refused_while_a_normal_request_is_answered(
        example_server, "embedding", "TEXT", hostile, np.array([[b"a normal sentence"]], dtype=object))
    assert error.code == 1005 and took < 5


@pytest.mark.parametrize("ids", [[[101, -1, 102]], [[101, 30522, 102]]])
def test_bert_called_directly_refuses_token_ids_outside_its_vocabulary(example_server, ids):
    ids = np.array(ids, np.int64)
    with TritonClient(example_server.grpc_url, protocol="grpc") as client, pytest.raises(InferenceError) as refused:
        client.infer("bert", {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids * 0})
    assert refused.value.code == 1301 and "outside [0, 30522)" in str(refused.value)
    assert "INVALID_ARGUMENT" in str(refused.value.status)


def test_bert_called_directly_refuses_more_tokens_than_its_positions(example_server):
    ids = np.full((1, 513), 1000, np.int64)   # MiniLM has 512 positions
    with TritonClient(example_server.grpc_url, protocol="grpc") as client, pytest.raises(InferenceError) as refused:
        client.infer("bert", {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": ids * 0})
    assert refused.value.code == 1303 and "513 positions, more than the model's 512" in str(refused.value)
    assert "INVALID_ARGUMENT" in str(refused.value.status)


def test_pooling_called_directly_refuses_nan(example_server):
    with TritonClient(example_server.http_url, protocol="http") as client, pytest.raises(InferenceError) as refused:
        client.infer("pooling", {"last_hidden_state": np.full((1, 3, 384), np.nan, np.float32),
                                 "attention_mask": np.ones((1, 3), np.int64)})
    assert refused.value.code == 1203


@pytest.mark.parametrize(("lengths", "code", "message"), [
    ((5, 7, 5), 1304, "inputs disagree on dimension 'sequence', which the model shares between them: "
                      "'input_ids' 5, 'attention_mask' 7, 'token_type_ids' 5"),
    ((0, 0, 0), 1305, "input 'input_ids' is empty: 0 entries on its axis 1 ('sequence')"),
])
def test_bert_called_directly_with_lengths_that_disagree_or_are_empty_is_400_without_internals(
        example_server, lengths, code, message):
    names = ("input_ids", "attention_mask", "token_type_ids")
    tensors = {name: np.full((1, n), int(name != "token_type_ids"), np.int64)
               for name, n in zip(names, lengths, strict=True)}
    status, body = raw_http_infer(example_server.http_url, "bert", tensors)
    assert status == 400, body
    assert f"[{code}] {message}" in body
    assert "onnxruntime" not in body and ".cc" not in body and "/" not in body, body
    with TritonClient(example_server.grpc_url, protocol="grpc") as client, pytest.raises(InferenceError) as refused:
        client.infer("bert", tensors)
    assert refused.value.code == code and "INVALID_ARGUMENT" in str(refused.value.status)
    ok = {name: np.ones((1, 4), np.int64) * (name != "token_type_ids") for name in names}
    with TritonClient(example_server.grpc_url, protocol="grpc") as client:   # and the server serves on
        assert client.infer("bert", ok)["last_hidden_state"].shape == (1, 4, 384)


def test_pooling_called_directly_with_finite_states_near_float32_max_gives_a_finite_unit_embedding(example_server):
    with TritonClient(example_server.http_url, protocol="http") as client:
        [embedding] = client.infer("pooling", {"last_hidden_state": np.full((1, 3, 384), 3e38, np.float32),
                                               "attention_mask": np.ones((1, 3), np.int64)})["embedding"]
    assert np.isfinite(embedding).all()
    np.testing.assert_allclose(embedding, np.full(384, 384 ** -0.5), rtol=1e-5)
