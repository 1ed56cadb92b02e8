"""The gateway against hostile and unlucky clients, without Triton (the in-process fake backend):
replays by respelling, gzip bodies and bombs, rate limits, log injection, weighted variants,
settings reload, its /metrics. tests/reliability/test_gateway_hostile.py does the timing-sensitive
cases (a 16 MB flood, half-sent bodies) against a real gateway process."""

from __future__ import annotations

import gzip
import json
import logging
import random
import time
from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_gateway_app import (
    EMBEDDING_CONFIG,
    EMBEDDING_METADATA,
    SECRET,
    SM2_PRIVATE,
    FakeTriton,
    make_client,
    post,
    settings_dict,
    signed,
)

from toolkit.gateway.app import create_app
from toolkit.gateway.auth import RateLimiter
from toolkit.gateway.body import printable
from toolkit.gateway.mapping import build_route, variant_key
from toolkit.gateway.settings import parse_settings
from toolkit.gateway.signing import canonical_string, sm2_sign


@pytest.fixture
def client():
    test_client, backend = make_client()
    with test_client:
        test_client.backend = backend
        yield test_client


@pytest.mark.parametrize("respell", [
    lambda s: s[:10] + "\n" + s[10:],
    lambda s: s + "\r\n",
    lambda s: s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1],   # other unused trailing bits
])
def test_a_replayed_sm2_request_is_refused_however_its_signature_is_spelled(client, respell):
    body = signed({"text": "pay once"}, sign_type="SM2")
    assert post(client, "embedding", body)[1]["code"] == 0
    replay = {**body, "signData": respell(body["signData"])}
    answer = post(client, "embedding", replay)[1]
    assert answer["code"] == 9800, answer
    assert client.backend.calls == 1


def test_a_gzip_body_is_accepted_and_a_gzip_bomb_is_413(client):
    body = json.dumps(signed({"text": "zipped"})).encode()
    ok = client.post("/api/embedding", content=gzip.compress(body), headers={"Content-Encoding": "gzip"})
    assert ok.status_code == 200 and ok.json()["code"] == 0
    bomb = gzip.compress(b"[" + b"0," * 200_000 + b"0]")   # 400 KB inflated, ~1 KB on the wire; limit 4096
    refused = client.post("/api/embedding", content=bomb, headers={"Content-Encoding": "gzip"})
    assert refused.status_code == 413 and refused.json()["code"] == 9801
    broken = client.post("/api/embedding", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert broken.json()["code"] == 9801 and "gzip" in broken.json()["data"]["msg"]


def test_answers_are_gzip_when_the_client_accepts_it(client):
    data = {"text": ["x" * 50] * 4}
    response = client.post("/api/embedding", content=json.dumps(signed(data)), headers={"Accept-Encoding": "gzip"})
    assert response.json()["code"] == 0
    big = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert big.headers.get("content-encoding") == "gzip"


def test_an_apps_rate_limit_answers_9810_with_429_and_spares_other_apps():
    test_client, _ = make_client(RateLimit={"PerSecond": 1, "Burst": 2, "Apps": {"plain-app": {"PerSecond": 0,
                                                                                               "Burst": 1}}})
    with test_client:
        codes = [post(test_client, "embedding", signed({"text": f"n{i}"}))[1]["code"] for i in range(4)]
        limited = test_client.post("/api/embedding", content=json.dumps(signed({"text": "again"})))
        plain = [post(test_client, "embedding", signed({"text": "p"}, sign_type="plain", app_id="plain-app",
                                                       signData=""))[1]["code"] for _ in range(5)]
    assert codes[:2] == [0, 0] and set(codes[2:]) == {9810}
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert set(plain) == {0}  # PerSecond 0: unlimited for that app


def test_a_request_refused_429_is_served_when_sent_again_unchanged():
    test_client, backend = make_client(RateLimit={"PerSecond": 4, "Burst": 1})
    with test_client:
        first = post(test_client, "embedding", signed({"text": "first"}))[1]["code"]
        second = signed({"text": "second"})
        refused = post(test_client, "embedding", second)
        time.sleep(0.5)  # the bucket refills one token per 0.25 s
        again = post(test_client, "embedding", second)
        replayed = post(test_client, "embedding", second)
    assert first == 0 and refused[0] == 429 and refused[1]["code"] == 9810
    assert again[1]["code"] == 0, again        # its signature was not spent by the 429
    assert replayed[1]["code"] == 9800          # but is once it has been served
    assert backend.calls == 2


def test_replays_do_not_spend_the_apps_rate():
    test_client, backend = make_client(RateLimit={"PerSecond": 0.01, "Burst": 2})
    with test_client:
        once = signed({"text": "once"})
        codes = [post(test_client, "embedding", once)[1]["code"] for _ in range(5)]
        other = post(test_client, "embedding", signed({"text": "other"}))[1]["code"]
    assert codes == [0, 9800, 9800, 9800, 9800] and other == 0 and backend.calls == 2


def test_rate_limiter_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(2, 2, {}, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(3)][:2] == [0, 0] and limiter.allow("a") > 0
    now[0] += 0.5
    assert limiter.allow("a") == 0


def test_control_characters_in_the_path_never_reach_the_log_raw(client, caplog):
    with caplog.at_level(logging.INFO, logger="toolkit.gateway"):
        answer = client.post("/api/em%1b[31m%00x%09y%C3%A9", content=json.dumps(signed({"text": "x"}))).json()
        crlf = client.post("/api/em%0d%0aFAKE%20LINE", content=json.dumps(signed({"text": "x"})))
    assert answer["code"] == 9709
    line = next(r.getMessage() for r in caplog.records if "POST /api/" in r.getMessage())
    assert not any(c in line for c in "\r\n\x1b\x00\t")
    assert "em\\x1b[31m\\x00x\\ty\\xe9" in line
    # A line break in the path matches no route at all: a plain 404, nothing logged from it.
    assert crlf.status_code == 404
    assert all("FAKE LINE" not in r.getMessage() for r in caplog.records)
    assert printable("a" * 500).endswith("...") and len(printable("a" * 500)) == 203


def variant_client(weights=(90, 10), sticky=None):
    raw = settings_dict(CheckWorkers=0, RateLimit={"PerSecond": 0, "Burst": 1})
    raw["Endpoints"] = {"embedding": {"Variants": [
        {"Name": "stable", "Model": "embedding", "Weight": weights[0]},
        {"Name": "canary", "Model": "embedding_v2", "Version": "2", "Weight": weights[1]}],
        **({"Sticky": sticky} if sticky else {})}}
    settings = parse_settings(raw)
    stable = build_route("embedding", "embedding", EMBEDDING_CONFIG, EMBEDDING_METADATA, None, 5)
    canary = build_route("embedding", "embedding_v2", EMBEDDING_CONFIG, EMBEDDING_METADATA, None, 5)
    from dataclasses import replace

    routes = {variant_key("embedding", "stable"): replace(stable, variant="stable"),
              variant_key("embedding", "canary"): replace(canary, version="2", variant="canary")}
    backend = FakeTriton()
    return TestClient(create_app(settings, routes, backend=backend)), settings


def test_5000_requests_at_90_10_are_split_within_2_points_and_say_which_variant_served():
    random.seed(11)
    client, _ = variant_client()
    served: Counter = Counter()
    with client:
        for i in range(5000):
            response = client.post("/api/embedding", content=json.dumps(signed({"text": f"t{i}"})))
            answer = response.json()
            assert answer["code"] == 0
            assert response.headers["x-variant"] == answer["data"]["variant"]
            served[answer["data"]["variant"]] += 1
        metrics = client.get("/metrics").text
    assert abs(served["canary"] / 5000 - 0.10) <= 0.02, served
    samples = {(s.name, s.labels.get("variant"), s.labels.get("code")): s.value
               for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples[("toolkit_gateway_requests_total", "canary", "0")] == served["canary"]
    assert samples[("toolkit_gateway_requests_total", "stable", "0")] == served["stable"]


def test_sticky_routing_sends_every_request_of_one_app_to_one_variant():
    client, _ = variant_client(weights=(50, 50), sticky="appId")
    with client:
        seen = {post(client, "embedding", signed({"text": f"t{i}"}))[1]["data"]["variant"] for i in range(40)}
    assert len(seen) == 1


def test_new_weights_apply_without_a_restart_and_a_new_variant_is_refused():
    client, _ = variant_client()
    gateway = client.app.state.gateway
    raw = settings_dict(CheckWorkers=0)
    raw["Endpoints"] = {"embedding": {"Variants": [{"Name": "stable", "Model": "embedding", "Weight": 0},
                                                   {"Name": "canary", "Model": "embedding_v2", "Version": "2",
                                                    "Weight": 1}]}}
    assert gateway.reload_endpoints(parse_settings(raw)) == []
    with client:
        assert {post(client, "embedding", signed({"text": f"t{i}"}))[1]["data"]["variant"]
                for i in range(20)} == {"canary"}
    other_version = {**raw["Endpoints"]["embedding"]["Variants"][1], "Version": "3"}
    assert gateway.reload_endpoints(parse_settings({**raw, "Endpoints": {"embedding": {"Variants": [
        raw["Endpoints"]["embedding"]["Variants"][0], other_version]}}})) == [
        "Endpoints.embedding: variant 'canary' (embedding_v2) was not routed at start"]
    raw["Endpoints"]["embedding"]["Variants"].append({"Name": "other", "Model": "x", "Weight": 1})
    assert gateway.reload_endpoints(parse_settings(raw)) == [
        "Endpoints.embedding: variant 'other' (x) was not routed at start"]


@pytest.mark.parametrize(("variants", "message"), [
    ([{"Name": "a", "Model": "m", "Weight": 0}], "weights must sum to more than 0"),
    ([{"Name": "a", "Model": "m", "Weight": 1}, {"Name": "a", "Model": "n", "Weight": 1}], "variant names must differ"),
    ([{"Name": "a", "Model": "m", "Weight": -1}], "greater than or equal to 0"),
])
def test_bad_endpoint_settings_are_refused_naming_the_problem(variants, message):
    from toolkit.errors import GatewayError

    raw = settings_dict()
    raw["Endpoints"] = {"embedding": {"Variants": variants}}
    with pytest.raises(GatewayError, match=message):
        parse_settings(raw)


def test_a_sign_check_in_a_worker_process_gives_the_same_answers():
    """CheckWorkers > 0: SM2 and large bodies are checked in a spawned process."""
    test_client, backend = make_client(CheckWorkers=1, MaxBodyBytes=1 << 20)
    with test_client:
        assert post(test_client, "embedding", signed({"text": "sm2"}, sign_type="SM2"))[1]["code"] == 0
        tampered = {**signed({"text": "sm2"}, sign_type="SM2"), "data": {"text": "tampered"}}
        assert post(test_client, "embedding", tampered)[1]["code"] == 9800
        large = signed({"text": "x" * 100_000})   # over the in-process size: checked in the worker too
        assert post(test_client, "embedding", large)[1]["code"] == 0
        resigned = {**tampered, "signData": sm2_sign(canonical_string(tampered, SECRET), SM2_PRIVATE)}
        assert post(test_client, "embedding", resigned)[1]["code"] == 0
    assert backend.calls == 3


def watched_client(tmp_path, raw):
    """A gateway whose settings file ``tmp_path/gateway.yaml`` is watched, with ``embedding``'s
    variants and its plain route (what discovery keeps for a removed endpoint)."""
    import yaml

    client, _ = variant_client()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    gateway = client.app.state.gateway
    routes = {**gateway.routes, "embedding": build_route("embedding", "embedding", EMBEDDING_CONFIG,
                                                         EMBEDDING_METADATA, None, 5)}
    app = create_app(parse_settings(raw), routes, backend=FakeTriton(), settings_file=path)
    return TestClient(app), path


def variant_settings():
    raw = settings_dict(CheckWorkers=0, RateLimit={"PerSecond": 0, "Burst": 1})
    raw["Endpoints"] = {"embedding": {"Variants": [
        {"Name": "stable", "Model": "embedding", "Weight": 90},
        {"Name": "canary", "Model": "embedding_v2", "Version": "2", "Weight": 10}]}}
    return raw


def reload_lines(caplog, path, raw, before: int) -> list[str]:
    """Write ``raw`` to the watched file and wait (at most 10 s) for the watcher's next line."""
    import yaml

    path.write_text(yaml.safe_dump(raw) if isinstance(raw, dict) else raw)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings")]
        if len(lines) > before:
            return lines
        time.sleep(0.1)
    raise AssertionError("the settings watcher said nothing within 10 s")


def test_a_reload_applies_removed_endpoints_or_refuses_the_file_in_one_line(tmp_path, caplog):
    raw = variant_settings()
    client, path = watched_client(tmp_path, raw)
    with caplog.at_level(logging.INFO, logger="toolkit.gateway"), client:
        gateway = client.app.state.gateway
        assert post(client, "embedding", signed({"text": "a"}))[1]["data"]["variant"] in {"stable", "canary"}
        # Another section changed with the weights: nothing applied, and one line says why.
        changed = variant_settings()
        changed["API"]["RateLimit"] = {"PerSecond": 5, "Burst": 5}
        changed["Endpoints"]["embedding"]["Variants"][0]["Weight"] = 0
        lines = reload_lines(caplog, path, changed, 0)
        assert lines[-1].startswith("settings file changed but was not applied") and "\n" not in lines[-1]
        assert "API.RateLimit changed (needs a restart)" in lines[-1]
        assert gateway.endpoints["embedding"].variants[0].weight == 90
        # A file that does not load: refused, one line naming the field.
        broken = variant_settings()
        broken["API"]["MaxBodyBytes"] = -1
        broken["API"]["ReqTimeDiff"] = 0
        lines = reload_lines(caplog, path, broken, len(lines))
        assert "not applied" in lines[-1] and "API.MaxBodyBytes" in lines[-1] and "API.ReqTimeDiff" in lines[-1]
        # Endpoints deleted: applied, the API served by its model again.
        removed = variant_settings()
        del removed["Endpoints"]
        lines = reload_lines(caplog, path, removed, len(lines))
        assert lines[-1].startswith("settings reloaded"), lines[-1]
        answer = post(client, "embedding", signed({"text": "b"}))[1]
    assert answer["code"] == 0 and "variant" not in answer["data"]
    assert gateway.endpoints == {}
    assert sum("settings reloaded" in r.getMessage() for r in caplog.records) == 1
