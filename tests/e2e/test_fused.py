"""`execution: fused` on the real tritonserver: the example's `embedding` and `mobile` ensembles and
their fused forms side by side. Clients must not be able to tell them apart, except by speed:
same outputs (bit for bit), same codes and HTTP statuses, a bad request failing alone, per-step
metrics."""

from __future__ import annotations

import json
import shutil
import urllib.request

import numpy as np
import pytest
import yaml
from bounded import wait_for
from prometheus_client.parser import text_string_to_metric_families
from serving import ROOT, call_concurrently, free_ports

from toolkit.bench.pipelines import load_corpus, make_images
from toolkit.client import TritonClient
from toolkit.errors import InferenceError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm_export, mobilenet_export):
    root = tmp_path_factory.mktemp("fused")
    shutil.copytree(ROOT / "model_repository", root / "models", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", root / "ensembles")
    shutil.copytree(minilm_export, root / "models" / "bert" / "1")
    shutil.copytree(mobilenet_export, root / "models" / "mobilenet" / "1")
    for name in ("embedding", "mobile"):
        spec = yaml.safe_load((root / "ensembles" / f"{name}.yaml").read_text())
        spec.update(api_path=f"{name}_fused", execution="fused")
        (root / "ensembles" / f"{name}_fused.yaml").write_text(yaml.safe_dump(spec))
    repository = generate_repository(load_project(root / "models", root / "ensembles"), root / "repo").path
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as running:
        yield running


def _texts(texts):
    return {"TEXT": np.array([[t.encode()] for t in texts], dtype=object)}


def test_fused_answers_equal_the_ensembles_bit_for_bit(server):
    texts, images = load_corpus()[:24], make_images(4)
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        for batch in (texts[:1], texts):
            assert np.array_equal(client.infer("embedding", _texts(batch))["EMBEDDING"],
                                  client.infer("embedding_fused", _texts(batch))["EMBEDDING"])
        pixels = {"IMAGE": np.array([[i] for i in images], dtype=object)}
        assert np.array_equal(client.infer("mobile", pixels)["EMBEDDING"],
                              client.infer("mobile_fused", pixels)["EMBEDDING"])


@pytest.mark.parametrize("model, inputs, code", [
    ("embedding", {"TEXT": np.array([[b"   "]], dtype=object)}, 1001),
    ("embedding", {"TEXT": np.array([[b"\xff\xfe"]], dtype=object)}, 1002),
    ("mobile", {"IMAGE": np.array([[b"not an image"]], dtype=object)}, 1101),
])
def test_fused_rejects_bad_input_with_the_same_code_and_status(server, model, inputs, code):
    statuses = {}
    for name in (model, f"{model}_fused"):
        with TritonClient(server.http_url, protocol="http") as client, pytest.raises(InferenceError) as caught:
            client.infer(name, inputs)
        assert f"[{code}]" in str(caught.value)
        statuses[name] = caught.value.status
    assert set(statuses.values()) == {"400"}, statuses


def test_a_bad_request_fails_alone_among_concurrent_ones(server):
    texts = load_corpus()[:7]
    requests = [_texts([t]) for t in texts] + [{"TEXT": np.array([[b""]], dtype=object)}]
    answers = call_concurrently(server.grpc_url, "embedding_fused", requests)
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        expected = client.infer("embedding", _texts(texts))["EMBEDDING"]
    for i, answer in enumerate(answers[:7]):
        assert not isinstance(answer, InferenceError), answer
        np.testing.assert_allclose(answer["EMBEDDING"][0], expected[i], atol=2e-6)
    assert isinstance(answers[7], InferenceError) and "[1001]" in str(answers[7])


def test_each_fused_step_reports_its_own_metrics(server):
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        client.infer("embedding_fused", _texts(["metrics per step", "and another"]))
        with pytest.raises(InferenceError):
            client.infer("embedding_fused", {"TEXT": np.array([[b""]], dtype=object)})

    def counts():
        text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
        requests, failures = {}, {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                model = sample.labels.get("model", "")
                if sample.name == "toolkit_hook_requests_total" and model.startswith("embedding_fused/"):
                    requests[model] = sample.value
                if sample.name == "toolkit_hook_failures_total" and model.startswith("embedding_fused/"):
                    failures[(model, sample.labels["code"])] = sample.value
        refused = sum(v for (model, _), v in failures.items() if model == "embedding_fused/tokenizer")
        return requests, failures, refused

    def settled(requests, failures, refused):
        return (requests.get("embedding_fused/tokenizer", 0) >= 2
                and failures.get(("embedding_fused/tokenizer", "1001"), 0) >= 1
                and requests.get("embedding_fused/bert") == requests.get("embedding_fused/pooling")
                == requests.get("embedding_fused/tokenizer", 0) - refused)

    def sent():
        now = counts()
        return now if settled(*now) else None

    # the stub sends its metric updates from a thread after the answers: wait for the last of them
    requests, failures, refused = wait_for(sent, 10) or counts()
    # the tokenizer saw both requests and refused one; bert and pooling saw only the good one
    assert requests["embedding_fused/tokenizer"] >= 2 and failures[("embedding_fused/tokenizer", "1001")] >= 1
    assert requests["embedding_fused/bert"] == requests["embedding_fused/pooling"] \
        == requests["embedding_fused/tokenizer"] - refused


def test_the_fused_model_says_what_it_runs(server):
    status, body = server.http("GET", "/v2/models/embedding_fused/config")
    config = json.loads(body)
    assert status == 200 and config["backend"] == "python" and "ensemble_scheduling" not in config
    assert config["parameters"]["toolkit.fused"]["string_value"] == "fused.json"


def test_instances_of_one_model_share_an_occupancy_lock(server):
    """The ONNX hook's adaptive threads see their peers through one lock file per model and version
    (toolkit/runtime/occupancy.py); models with one instance need none."""
    from toolkit.runtime.occupancy import lock_file

    pid = server.process.pid  # each instance opens the file when it starts
    for model in ("bert", "mobilenet", "embedding_fused", "mobile_fused"):
        assert lock_file(pid, model, 1).exists(), model
    assert not lock_file(pid, "tokenizer", 1).exists()  # one instance: nothing to share
