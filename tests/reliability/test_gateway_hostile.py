"""The real gateway under hostile and unlucky clients, in front of the real tritonserver: a 16 MB
unauthenticated body and a flood of forged SM2 signatures while others are served, half-sent bodies,
a client that hangs up, and a python stub killed behind it (its clients lose nothing)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from gateway_helpers import APP, call, running_gateway, signed
from serving import example_repository, free_ports

from toolkit.server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.reliability]


@pytest.fixture(scope="module")
def gateway(example_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with running_gateway(root, example_server.grpc_url,
                         API={"BodyReadTimeout": 2, "MaxBodyBytes": 16 * 1024 * 1024 + 4096,
                              "RateLimit": {"PerSecond": 0, "Burst": 1}}) as gw:
        yield gw


def hostile_body() -> bytes:
    """Just under 16 MB of small integers, the public demo appId, a fresh timestamp, a fake signature."""
    numbers = "[" + ",".join(["7"] * 7_900_000) + "]"
    return json.dumps({"appId": APP, "version": "1", "signType": "SHA256", "encType": "plain",
                       "timestamp": int(time.time()), "signData": "A" * 86 + "==",
                       "data": {"text": "x", "junk": "@@"}}).replace('"@@"', numbers).encode()


def test_a_16mb_forged_request_does_not_delay_anyone_else(gateway):
    body = hostile_body()
    assert 15_000_000 < len(body) < 16 * 1024 * 1024
    probes: list[float] = []
    answers: Counter = Counter()
    hostile: list[dict] = []
    done = threading.Event()

    def attack():
        for _ in range(2):
            hostile.append(httpx.post(f"{gateway.url}/api/embedding", content=body, timeout=120).json())
        done.set()

    def normal():
        n = 0
        while not done.is_set():
            n += 1  # each request its own content: the same signature twice would be a replay
            _, answer = call(gateway, "embedding", signed({"text": f"still served {n}"}))
            answers[answer["code"]] += 1

    attacker = threading.Thread(target=attack)
    worker = threading.Thread(target=normal)
    attacker.start()
    worker.start()
    with httpx.Client() as client:
        while not done.is_set():
            started = time.perf_counter()
            assert client.get(f"{gateway.url}/", timeout=10).status_code == 200
            probes.append(time.perf_counter() - started)
            time.sleep(0.02)
    attacker.join()
    worker.join()
    assert [a["code"] for a in hostile] == [9800, 9800]
    assert len(probes) >= 20 and answers[0] >= 5 and set(answers) == {0}, answers
    probes.sort()
    # Generous bounds (a loaded 2-core VM); RELIABILITY.md has the measured figures.
    assert probes[len(probes) // 2] < 0.05 and probes[-1] < 0.5, (probes[len(probes) // 2], probes[-1])
    print(f"\nGET / while 2 x 16 MB forged requests were checked: {len(probes)} probes, p50 "
          f"{probes[len(probes) // 2] * 1000:.1f} ms, max {probes[-1] * 1000:.1f} ms; "
          f"{answers[0]} signed requests answered meanwhile")


def test_a_flood_of_forged_sm2_signatures_is_bounded_and_others_are_served(gateway):
    forged = signed({"text": "forged"}, sign_type="SM2")
    forged["data"] = {"text": "tampered"}
    results: Counter = Counter()
    lock = threading.Lock()

    def flood():
        with httpx.Client() as client:
            for _ in range(25):
                response = client.post(f"{gateway.url}/api/embedding", content=json.dumps(forged), timeout=30)
                code = response.json()["code"]
                with lock:
                    results[code] += 1

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    served = [call(gateway, "embedding", signed({"text": f"ok {i}"}))[1]["code"] for i in range(10)]
    for t in threads:
        t.join()
    assert sum(results.values()) == 200 and set(results) <= {9800, 9996}, results
    assert served == [0] * 10


def test_half_sent_bodies_are_dropped_after_the_read_timeout_while_others_are_served(gateway):
    host, port = gateway.url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(60):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /api/embedding HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"appId\":")
        sockets.append(s)
    assert call(gateway, "embedding", signed({"text": "while they wait"}))[1]["code"] == 0
    time.sleep(3)  # BodyReadTimeout is 2 s here
    statuses = []
    for s in sockets:
        s.settimeout(5)
        head = s.recv(200)
        statuses.append(head.split(b" ")[1] if head else b"closed")
        s.close()
    assert Counter(statuses) == Counter({b"408": 60}), Counter(statuses)


def test_a_client_that_hangs_up_mid_body_is_one_info_line(gateway):
    host, port = gateway.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /api/embedding HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"appId\":")
    time.sleep(0.2)
    s.close()
    time.sleep(0.5)
    log = gateway.log.read_text()
    assert "client disconnected before its body arrived" in log
    assert "Traceback" not in log and " ERROR " not in log


def test_a_stub_killed_behind_the_gateway_costs_its_clients_nothing(tmp_path, minilm_export, mobilenet_export):
    repository = example_repository(tmp_path, minilm_export, mobilenet_export)
    http, grpc, metrics = free_ports(3)
    events: list[str] = []
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log", on_event=events.append) as server, \
            running_gateway(tmp_path, server.grpc_url, API={"RateLimit": {"PerSecond": 0, "Burst": 1}}) as gw:
        codes: Counter = Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def client(i):
            with httpx.Client() as http_client:
                n = 0
                while not stop.is_set():
                    n += 1
                    body = json.dumps(signed({"text": f"client {i} request {n}"}))
                    code = http_client.post(f"{gw.url}/api/embedding", content=body, timeout=30).json()["code"]
                    with lock:
                        codes[code] += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        time.sleep(3)
        server.watchdog.scan()
        tokenizer = next(s for s in server.watchdog.alive("tokenizer"))
        os.kill(tokenizer.pid, signal.SIGKILL)
        time.sleep(7)
        # Usually the model is reloaded within 2 s. A stub killed while it holds a lock shared with
        # tritonserver takes the server down instead, and starting it again took over 7 s on a slow VM.
        deadline = time.monotonic() + 120
        while not server.watchdog.heals and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # served after the recovery too
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert len(server.watchdog.heals) == 1, events
        recovery = server.watchdog.heals[0].action
        retries = gw.log.read_text().count("retries=")
    assert set(codes) == {0}, codes            # sent, answered: all; failed, lost: none
    assert codes[0] > 16 * 10 and retries > 0
    print(f"\n{codes[0]} gateway requests, 0 failed, {retries} answered after a retry ({recovery})")
