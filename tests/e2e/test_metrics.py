"""Per-hook metrics on Triton's own /metrics: scraped and parsed with Prometheus' own parser, the
counts checked against the requests this test sent (deltas: the shared server serves other tests)."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from bounded import wait_for
from prometheus_client.parser import text_string_to_metric_families

from toolkit.client import TritonClient
from toolkit.errors import InferenceError

pytestmark = pytest.mark.e2e


def scrape(server) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("toolkit_hook_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def delta(before, after, name, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_hook_metrics_count_requests_failures_and_batches_per_model(example_server):
    before = scrape(example_server)
    with TritonClient(example_server.grpc_url, protocol="grpc") as client:
        for i in range(7):
            client.infer("embedding", {"TEXT": np.array([[f"sentence number {i}".encode()]], dtype=object)})
        client.infer("embedding", {"TEXT": np.array([[b"one"], [b"two"], [b"three"]], dtype=object)})
        for _ in range(2):
            with pytest.raises(InferenceError) as failed:
                client.infer("embedding", {"TEXT": np.array([[b"   "]], dtype=object)})
            assert failed.value.code == 1001
    tok, bert, pool = ({"model": m, "version": "1"} for m in ("tokenizer", "bert", "pooling"))
    # each stub sends its metric updates from a thread of its own, after the answers: wait for them
    def sent():
        now = scrape(example_server)
        return now if (delta(before, now, "toolkit_hook_requests_total", **pool) >= 8
                       and delta(before, now, "toolkit_hook_failures_total", code="1001", **tok) >= 2) else None

    after = wait_for(sent, 10) or scrape(example_server)

    assert delta(before, after, "toolkit_hook_requests_total", **tok) == 10
    assert delta(before, after, "toolkit_hook_failures_total", code="1001", **tok) == 2
    assert delta(before, after, "toolkit_hook_api_entry_duration_seconds_count", **tok) == 10
    # The 8 accepted requests reached BERT and pooling; 10 rows in all (7 + 3).
    assert delta(before, after, "toolkit_hook_requests_total", **bert) == 8
    assert delta(before, after, "toolkit_hook_requests_total", **pool) == 8
    assert delta(before, after, "toolkit_hook_batch_rows_sum", **bert) == 10
    assert delta(before, after, "toolkit_hook_infer_duration_seconds_count", **bert) >= 1
    assert delta(before, after, "toolkit_hook_infer_duration_seconds_sum", **bert) > 0
    assert not any(name == "toolkit_hook_failures_total" and dict(labels).get("model") == "bert"
                   and after[(name, labels)] != before.get((name, labels), 0) for name, labels in after)
