"""Weighted variants: the split follows the weights, sticky routing keeps a caller on one variant."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from toolkit.gateway.metrics import GatewayMetrics
from toolkit.gateway.variants import Endpoint, Variant

CANARY = Endpoint("embedding", (Variant("stable", "embedding", "", 90), Variant("canary", "embedding_v2", "", 10)))


def test_5000_requests_at_90_10_land_within_2_points():
    rng = random.Random(7)
    counts = Counter(CANARY.choose({}, rng).name for _ in range(5000))
    assert abs(counts["canary"] / 5000 - 0.10) <= 0.02, counts


def test_sticky_routing_keeps_every_request_of_an_app_on_one_variant_and_still_splits_apps():
    sticky = Endpoint("embedding", CANARY.variants, sticky="appId")
    per_app = {f"app-{i}": {sticky.choose({"appId": f"app-{i}"}).name for _ in range(20)} for i in range(2000)}
    assert all(len(names) == 1 for names in per_app.values())
    canary_share = sum(names == {"canary"} for names in per_app.values()) / len(per_app)
    assert abs(canary_share - 0.10) <= 0.02, canary_share


def test_a_zero_weight_variant_gets_nothing():
    endpoint = Endpoint("e", (Variant("a", "m", "", 1), Variant("off", "m2", "", 0)))
    assert {endpoint.choose({}).name for _ in range(500)} == {"a"}


@pytest.mark.parametrize("weights", [(0, 0), (-1, 2)])
def test_weights_that_do_not_sum_to_something_positive_are_refused(weights):
    with pytest.raises(ValueError, match="weights must be >= 0 and sum to more than 0"):
        Endpoint("e", tuple(Variant(f"v{i}", "m", "", w) for i, w in enumerate(weights)))


def test_gateway_metrics_render_prometheus_text():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = GatewayMetrics()
    metrics.observe("embedding", "canary", 0, 0.01)
    metrics.observe("embedding", "canary", 0, 0.02)
    metrics.retried("embedding")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    assert samples[("toolkit_gateway_requests_total", (("api", "embedding"), ("code", "0"),
                                                       ("variant", "canary")))] == 2
    assert samples[("toolkit_gateway_retries_total", (("api", "embedding"),))] == 1
