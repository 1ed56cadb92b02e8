"""One value per batch row on the real tritonserver: an ONNX model whose input and output have shape
[batch] (spec dims [], served as dims [1] + reshape []), from a fresh export's default model.yaml
(toolkit/export/servable.py) through gen-repo to HTTP and gRPC, alone, in an ensemble and fused.

What Triton does with the reshape (r24.10): clients send and receive such a tensor as [batch, 1];
the model gets and returns [batch]. Sent as [batch] it is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx_models import write_scalar_onnx
from projects import python_model, write_ensemble, write_model
from serving import call_concurrently, free_ports

from toolkit.client import TritonClient
from toolkit.errors import InferenceError
from toolkit.export.servable import write_model_yaml
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer

pytestmark = pytest.mark.e2e

# The step after the ONNX model in the ensembles: it declares dims [1], as Triton passes `score` on.
TIMES_TEN = '''
from toolkit.hooks import Hook


class TimesTen(Hook):
    def infer(self, batch):
        if batch["S"].ndim != 2 or batch["S"].shape[1] != 1:
            raise ValueError(f"S arrived with shape {list(batch['S'].shape)}, expected [n, 1]")
        return {"T": batch["S"] * 10}
'''


def _ensemble(execution: str) -> dict:
    return {"max_batch_size": 8, "execution": execution,
            "inputs": [{"name": "x", "dtype": "FP32", "dims": [4]}, {"name": "offset", "dtype": "FP32", "dims": [1]}],
            "outputs": [{"name": "score", "dtype": "FP32", "dims": [1]}, {"name": "t", "dtype": "FP32", "dims": [1]}],
            "steps": [{"model": "scalar", "inputs": {"x": "x", "offset": "offset"}, "outputs": {"score": "score"}},
                      {"model": "times_ten", "inputs": {"S": "score"}, "outputs": {"T": "t"}}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("scalar")
    folder = root / "models" / "scalar"
    onnx = write_scalar_onnx(folder / "1" / "model.onnx")
    assert write_model_yaml(folder, onnx, "toolkit export keras scalar.keras") == folder / "model.yaml"
    write_model(root, "times_ten", python_model([("S", "FP32", [1])], [("T", "FP32", [1])], hook="post:TimesTen"),
                files={"post.py": TIMES_TEN})
    write_ensemble(root, "chain", _ensemble("ensemble"))
    write_ensemble(root, "chain_fused", _ensemble("fused"))
    repository = generate_repository(load_project(root / "models", root / "ensembles"), root / "repository").path
    assert "reshape: { shape: [ ] }" in (repository / "scalar" / "config.pbtxt").read_text()
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as running:
        yield running


def _url(server: TritonServer, protocol: str) -> str:
    return server.http_url if protocol == "http" else server.grpc_url


def _inputs(rows: int, start: float = 0) -> dict[str, np.ndarray]:
    x = (np.arange(rows * 4, dtype=np.float32) + start).reshape(rows, 4)
    return {"x": x, "offset": np.arange(rows, dtype=np.float32).reshape(rows, 1) * 100}


def _score(inputs: dict[str, np.ndarray]) -> np.ndarray:
    return inputs["x"].sum(axis=1, keepdims=True) + inputs["offset"]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("rows", [1, 3])
def test_a_per_row_scalar_output_comes_back_as_batch_by_1_beside_a_row_output(server, protocol, rows):
    inputs = _inputs(rows)
    with TritonClient(_url(server, protocol), protocol=protocol) as client:
        out = client.infer("scalar", inputs)
    assert out["score"].shape == (rows, 1) and out["score"].dtype == np.float32
    np.testing.assert_allclose(out["score"], _score(inputs), rtol=1e-6)
    if rows == 3:
        np.testing.assert_allclose(out["score"].ravel(), [6, 122, 238], rtol=1e-6)
    assert out["doubled"].shape == (rows, 4)
    np.testing.assert_array_equal(out["doubled"], inputs["x"] * 2)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_per_row_scalar_input_sent_without_its_trailing_1_is_refused(server, protocol):
    inputs = {**_inputs(3), "offset": np.zeros(3, np.float32)}
    with TritonClient(_url(server, protocol), protocol=protocol) as client, pytest.raises(InferenceError) as info:
        client.infer("scalar", inputs)
    assert "unexpected shape for input 'offset'" in str(info.value) and "Expected [-1,1], got [3]" in str(info.value)


def test_concurrent_requests_batched_together_each_get_their_own_rows(server):
    requests = [_inputs(rows, start=10 * i) for i, rows in enumerate([1, 3, 2, 1, 3, 2, 1, 3])]
    for inputs, out in zip(requests, call_concurrently(server.grpc_url, "scalar", requests), strict=True):
        assert out["score"].shape == (len(inputs["x"]), 1)
        np.testing.assert_allclose(out["score"], _score(inputs), rtol=1e-6)
        np.testing.assert_array_equal(out["doubled"], inputs["x"] * 2)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("ensemble", ["chain", "chain_fused"])
def test_an_ensemble_passes_the_scalar_on_as_batch_by_1(server, protocol, ensemble):
    inputs = _inputs(3)
    with TritonClient(_url(server, protocol), protocol=protocol) as client:
        out = client.infer(ensemble, inputs)
    assert out["score"].shape == (3, 1) and out["t"].shape == (3, 1)
    np.testing.assert_allclose(out["score"], _score(inputs), rtol=1e-6)
    np.testing.assert_allclose(out["t"], _score(inputs) * 10, rtol=1e-6)


def test_the_generated_model_yaml_served_with_its_defaults(server):
    text = (Path(server.repository) / "scalar" / "config.pbtxt").read_text()
    assert "max_batch_size: 16" in text and "count: 2" in text and "max_queue_size: 256" in text
