"""Honest statuses on Triton's own ports: a hook's deliberate rejection is the caller's fault (HTTP 400,
gRPC INVALID_ARGUMENT), a crash in ``infer`` is the server's (500 / INTERNAL, code 9998), a full or
timed-out queue is "busy, retry" (503 / UNAVAILABLE, 9996) or a timeout (9997), directly and through
an ensemble. Raw HTTP (urllib) and raw tritonclient gRPC, so the statuses are Triton's own.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from serving import raw_http_infer
from tritonclient.utils import InferenceServerException

from toolkit.client.failures import classify_triton_error
from toolkit.hooks import INFERENCE_FAILED, QUEUE_TIMEOUT, UNAVAILABLE

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def http_infer(url: str, model: str, x: list[list[float]], timeout_us: int | None = None) -> tuple[int, str]:
    return raw_http_infer(url, model, {"X": np.array(x, dtype=np.float32)},
                          {"timeout": timeout_us} if timeout_us is not None else None)


def grpc_infer(url: str, model: str, x: np.ndarray) -> tuple[str, str]:
    client = grpcclient.InferenceServerClient(url)
    try:
        item = grpcclient.InferInput("X", list(x.shape), "FP32")
        item.set_data_from_numpy(x)
        client.infer(model, [item], client_timeout=30)
        return "OK", ""
    except InferenceServerException as e:
        return str(e.status()), e.message()
    finally:
        client.close()


@pytest.mark.parametrize("model", ["scale", "pipeline"])
def test_hook_rejection_is_400_and_invalid_argument_directly_and_through_an_ensemble(triton, model):
    status, body = http_infer(triton.server.http_url, model, [[-1.0, 0, 0, 0]])
    assert status == 400, body
    assert "[1001] X must be non-negative" in body
    status, message = grpc_infer(triton.server.grpc_url, model, np.array([[-1.0, 0, 0, 0]], np.float32))
    assert status == "StatusCode.INVALID_ARGUMENT" and "[1001]" in message


@pytest.mark.parametrize("model", ["scale", "pipeline"])
def test_crash_in_infer_is_500_internal_with_9998(triton, model):
    status, body = http_infer(triton.server.http_url, model, [[float("nan"), 0, 0, 0]])
    assert status == 500, body
    assert classify_triton_error(json.loads(body)["error"])[0] == INFERENCE_FAILED
    status, message = grpc_infer(triton.server.grpc_url, model, np.array([[np.nan, 0, 0, 0]], np.float32))
    assert status == "StatusCode.INTERNAL" and "[9998]" in message


def test_full_queue_is_503_unavailable_9996_and_a_queue_timeout_is_9997(triton):
    """`sleepy`: one instance taking 1 s per request, a queue of 4 with a 100 ms timeout. Ten requests
    at once: one runs, the rest time out in the queue or find it full; each is classified, none is
    reported as a broken model."""
    barrier = threading.Barrier(10)

    def one(_):
        barrier.wait(timeout=60)
        return http_infer(triton.server.http_url, "sleepy", [[1.0]])

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(one, range(10)))   # bounded by each call's 30 s timeout
    statuses = sorted(status for status, _ in results)
    codes = [classify_triton_error(json.loads(body)["error"])[0] for status, body in results if status != 200]
    assert statuses.count(200) >= 1
    assert set(statuses) <= {200, 503}, results
    assert set(codes) <= {UNAVAILABLE, QUEUE_TIMEOUT} and codes, results
    assert any("maximum queue size" in body for _, body in results), results
