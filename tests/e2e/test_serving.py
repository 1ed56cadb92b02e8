"""End to end on the real tritonserver: python hooks, ONNX, an ensemble, over HTTP and gRPC."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from onnx_models import LINEAR_B, LINEAR_W
from serving import call_concurrently

from toolkit.cli.main import cli
from toolkit.client import TritonClient
from toolkit.errors import InferenceError
from toolkit.hooks import INFERENCE_FAILED, QUEUE_TIMEOUT

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["http", "grpc"])
def client(request, triton):
    with TritonClient(triton.url(request.param), protocol=request.param) as c:
        yield c


def test_python_hook_model_returns_scaled_values(client):
    x = np.array([[1, 2, 3, 4], [0.5, 0, 0, 1]], dtype=np.float32)
    out = client.infer("scale", {"X": x})
    np.testing.assert_array_equal(out["Y"], x * 2)
    assert out["Y"].dtype == np.float32


def test_onnx_model_matches_numpy(client):
    x = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    out = client.infer("linear", {"x": x})
    np.testing.assert_allclose(out["y"], x @ LINEAR_W + LINEAR_B, rtol=1e-6, atol=1e-6)


def test_ensemble_fans_out_to_onnx_and_python_and_fans_back_in(client):
    x = np.array([[1, 2, 3, 4], [0, 0, 0, 1]], dtype=np.float32)
    out = client.infer("pipeline", {"X": x})
    scaled = x * 2
    np.testing.assert_array_equal(out["SCALED"], scaled)
    expected = np.concatenate([scaled @ LINEAR_W + LINEAR_B, scaled.sum(axis=1, keepdims=True)], axis=1)
    np.testing.assert_allclose(out["OUT"], expected, rtol=1e-6)
    np.testing.assert_allclose(out["OUT"][0], [8.5, 9.0, 20.0], rtol=1e-6)


def test_dynamic_batcher_runs_fewer_executions_than_requests_under_concurrent_load(triton):
    with TritonClient(triton.url("http")) as c:
        before = c.statistics("scale")
    requests = [{"X": np.full((1, 4), i, dtype=np.float32)} for i in range(32)]
    results = call_concurrently(triton.url("grpc"), "scale", requests)
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["Y"], np.full((1, 4), 2 * i))
    with TritonClient(triton.url("http")) as c:
        after = c.statistics("scale")
    inferences = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert inferences == 32
    assert executions < inferences / 2, (inferences, executions)
    assert max(int(out["BATCH"][0, 0]) for out in results) > 1


def test_rejected_request_fails_alone_while_its_batch_neighbours_succeed(triton):
    requests = [{"X": np.full((1, 4), -1.0 if i % 4 == 0 else i, dtype=np.float32)} for i in range(16)]
    results = call_concurrently(triton.url("grpc"), "scale", requests)
    for i, out in enumerate(results):
        if i % 4 == 0:
            assert isinstance(out, InferenceError) and out.code == 1001
            assert "X must be non-negative" in str(out) and "Traceback" not in str(out)
        else:
            np.testing.assert_array_equal(out["Y"], np.full((1, 4), 2 * i))
    assert max(int(out["BATCH"][0, 0]) for out in results if isinstance(out, dict)) > 1


def test_request_that_breaks_infer_fails_alone_while_its_batch_neighbours_succeed(triton):
    requests = [{"X": np.full((1, 4), np.nan if i == 3 else i, dtype=np.float32)} for i in range(8)]
    results = call_concurrently(triton.url("grpc"), "scale", requests)
    assert isinstance(results[3], InferenceError) and results[3].code == INFERENCE_FAILED
    assert "NaN reached infer" in str(results[3]) and "Traceback" not in str(results[3])
    for i, out in enumerate(results):
        if i != 3:
            np.testing.assert_array_equal(out["Y"], np.full((1, 4), 2 * i))


def test_variable_length_requests_are_padded_together_and_trimmed_back(triton):
    requests = [{"TOKENS": np.arange(1, n + 1, dtype=np.int64)[None, :]} for n in range(1, 9)]
    results = call_concurrently(triton.url("grpc"), "ragged", requests)
    for request, out in zip(requests, results, strict=True):
        np.testing.assert_array_equal(out["ECHO"], request["TOKENS"])
    widths = [int(out["WIDTH"][0, 0]) for out in results]
    assert all(w >= n for w, n in zip(widths, range(1, 9), strict=True))
    assert any(w > n for w, n in zip(widths, range(1, 9), strict=True)), widths  # padded in a shared batch


def test_request_that_outwaits_the_queue_timeout_gets_a_clear_error(triton):
    requests = [{"X": np.ones((1, 1), dtype=np.float32)} for _ in range(3)]
    results = call_concurrently(triton.url("grpc"), "sleepy", requests)
    failures = [r for r in results if isinstance(r, InferenceError)]
    assert 1 <= len(failures) <= 2 and len(results) - len(failures) >= 1
    for failure in failures:
        assert failure.code == QUEUE_TIMEOUT
        assert "timeout" in str(failure).lower()


@pytest.mark.parametrize(("inputs", "words"), [
    ({"X": np.ones((1, 2), dtype=np.float32)}, "unexpected shape for input 'X'"),
    ({"X": np.ones((1, 4), dtype=np.int32)}, "data-type is 'INT32', but model 'scale' expects 'FP32'"),
    ({"NOPE": np.ones((1, 4), dtype=np.float32)}, "NOPE"),
    ({"X": np.ones((33, 4), dtype=np.float32)}, "batch-size must be <= 32"),
])
def test_wrong_tensor_gets_a_clear_error_and_the_server_stays_up(client, inputs, words):
    with pytest.raises(InferenceError) as info:
        client.infer("scale", inputs)
    assert words.lower() in str(info.value).lower()
    np.testing.assert_array_equal(client.infer("scale", {"X": np.ones((1, 4), np.float32)})["Y"], [[2, 2, 2, 2]])


def test_toolkit_infer_prints_outputs_as_json(triton):
    for protocol in ("http", "grpc"):
        result = CliRunner().invoke(cli, ["infer", "pipeline", "-i", "X=[1, 2, 3, 4]", "--protocol", protocol,
                                          "--url", triton.url(protocol)])
        assert result.exit_code == 0, result.output
        assert '"OUT": [[8.5, 9.0, 20.0]]' in result.output


def test_toolkit_infer_reports_the_hook_error_without_traceback(triton):
    result = CliRunner().invoke(cli, ["infer", "scale", "-i", "X=[-1, 2, 3, 4]", "--url", triton.url("http")])
    assert result.exit_code == 1
    assert "Error: model 'scale': [1001] X must be non-negative" in result.output
    assert "Traceback" not in result.output
