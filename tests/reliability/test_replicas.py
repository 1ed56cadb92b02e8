"""Three tritonservers over one repository, balanced by gRPC itself (round_robin, health checking and
a retry policy in the channel's service config): the load spreads evenly; a replica killed -9 under
load costs its callers nothing; it is restarted and takes traffic again."""

from __future__ import annotations

import itertools
import os
import signal
import time

import numpy as np
import pytest
from bounded import Background
from projects import python_model, write_model
from serving import free_port_run, free_ports

from toolkit.client import TritonClient
from toolkit.errors import InferenceError, ServerError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server.replicas import ReplicaSet

#: The slowest test took 40 s (setup included) on a busy 2-core VM.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(150)]

WORK_HOOK = '''
import time

from toolkit.hooks import Hook


class Work(Hook):
    def infer(self, batch):
        time.sleep(0.004)
        return {"Y": batch["X"] * 2}
'''
CLIENTS = 16


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    write_model(root, "work", python_model([("X", "FP32", [1])], [("Y", "FP32", [1])], hook="work:Work"),
                files={"work.py": WORK_HOOK})
    repository = generate_repository(load_project(root / "models"), root / "repo").path
    events: list[str] = []
    replicas = ReplicaSet(repository, 3, http_port=free_port_run(9), on_event=events.append, log_dir=root)
    replicas.events = events  # type: ignore[attr-defined]
    with replicas:
        yield replicas


def executions(replicas: ReplicaSet) -> list[int]:
    counts = []
    for server in replicas.servers:
        with TritonClient(server.grpc_url, protocol="grpc") as client:
            counts.append(int(client.statistics("work")["inference_stats"]["success"].get("count", 0)))
    return counts


def test_round_robin_spreads_the_load_and_a_killed_replica_costs_nothing(replicas):
    addresses = ",".join(replicas.grpc_addresses)
    x = np.array([[1.5]], np.float32)

    def client(c: TritonClient) -> str:
        try:
            return "answered" if c.infer("work", {"X": x})["Y"].tolist() == [[3.0]] else "wrong"
        except InferenceError as e:
            return f"failed {e.code}: {e}"[:120]

    start_counts = executions(replicas)
    with Background(seconds=120, join_timeout=30, name="clients") as load:   # calls: 10 s at most
        load.loop(client, threads=CLIENTS, context=lambda: TritonClient(addresses, protocol="grpc", timeout=10))
        load.sleep(6)
        before_kill = [n - s for n, s in zip(executions(replicas), start_counts, strict=True)]
        victim = replicas.servers[1]
        killed = victim.process
        os.kill(killed.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert load.until(lambda: replicas.restarts, 60, step=0.1), replicas.events
        restarted = replicas.servers[1]
        after_restart_start = executions(replicas)
        load.sleep(4)
        after_restart = [n - s for n, s in zip(executions(replicas), after_restart_start, strict=True)]
    outcomes = load.counts

    assert set(outcomes) == {"answered"}, outcomes            # nothing lost, nothing failed
    total = sum(before_kill)
    assert total > 300, before_kill
    assert all(abs(n / total - 1 / 3) <= 0.10 for n in before_kill), before_kill   # +-10% of a third
    # the same replica (its supervisor), a new tritonserver process on the same ports
    assert restarted.process is not killed and restarted.grpc_url == victim.grpc_url
    assert replicas.restarts[0].error is None
    assert after_restart[1] > 0.1 * sum(after_restart), after_restart              # back in the rotation
    print(f"\n{outcomes['answered']} answered, 0 failed; shares before the kill {before_kill}; "
          f"replica 1 restarted in {replicas.restarts[0].seconds:.1f}s "
          f"(killed at +{killed_at:.0f}); shares after {after_restart}")


def test_zero_replicas_and_bad_addresses_are_clear_errors(tmp_path):
    with pytest.raises(ServerError, match="--replicas must be at least 1"):
        ReplicaSet(tmp_path, 0)
    with pytest.raises(InferenceError, match="is not host:port"):
        TritonClient("127.0.0.1:8001,nonsense", protocol="grpc")
    with pytest.raises(InferenceError, match="several replicas need --protocol grpc"):
        TritonClient("127.0.0.1:8000,127.0.0.1:8003", protocol="http")


def test_every_replica_down_is_a_clear_failure_not_a_hang():
    ports = free_ports(2)
    with TritonClient(",".join(f"127.0.0.1:{p}" for p in ports), protocol="grpc", timeout=3) as client:
        started = time.monotonic()
        with pytest.raises(InferenceError) as failed:
            client.infer("work", {"X": np.array([[1.0]], np.float32)})
    assert time.monotonic() - started < 10
    assert failed.value.code in (9996, 9997), failed.value


def test_gateway_over_three_replicas_loses_nothing_when_one_is_killed_and_spreads_the_load(replicas, tmp_path):
    """16 signed clients through the gateway for 30 s; at 10 s one replica is killed -9."""
    import json as _json

    import httpx
    from gateway_helpers import running_gateway, signed

    write_api = {"Apis": {"work": {"Model": "work", "Inputs": {"x": {"Tensor": "X"}}, "Outputs": {"Y": "ys"}}},
                 "API": {"RateLimit": {"PerSecond": 0, "Burst": 1}}}
    requests = itertools.count()
    with running_gateway(tmp_path, ",".join(replicas.grpc_addresses), replace=("Apis",), **write_api) as gateway:
        def client(http: httpx.Client):
            n = next(requests)
            body = _json.dumps(signed({"x": [float(n % 100)], "request": n}))
            answer = http.post(f"{gateway.url}/api/work", content=body, timeout=30).json()
            ok = answer["code"] == 0 and answer["data"]["ys"] == [2.0 * (n % 100)]
            return answer["code"] if not ok and answer["code"] else ("ok" if ok else "wrong")

        restarts_before = len(replicas.restarts)
        start_counts = executions(replicas)
        with Background(seconds=130, join_timeout=40, name="clients") as load:   # calls: 30 s at most
            load.loop(client, threads=CLIENTS, context=httpx.Client)
            load.sleep(10)
            before_kill = [n - s for n, s in zip(executions(replicas), start_counts, strict=True)]
            os.kill(replicas.servers[2].process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            load.until(lambda: len(replicas.restarts) > restarts_before, 60, step=0.1)
            back = executions(replicas)
            load.sleep(max(0.0, 20 - (time.monotonic() - killed_at)))   # served for 20 s after the kill
            load.sleep(5)
            after = [n - s for n, s in zip(executions(replicas), back, strict=True)]
    codes = load.counts
    assert set(codes) == {"ok"}, codes                                      # none lost, none failed
    total = sum(before_kill)
    assert all(abs(n / total - 1 / 3) <= 0.10 for n in before_kill), before_kill
    assert len(replicas.restarts) > restarts_before and after[2] > 0.1 * sum(after), (replicas.events, after)
    print(f"\ngateway: {codes['ok']} answered, 0 failed; shares before the kill {before_kill}, "
          f"after the restart {after}")


def test_gateway_starts_over_an_address_list_with_one_replica_down_and_says_so_once(replicas, tmp_path):
    from gateway_helpers import call, running_gateway, signed

    (dead,) = free_ports(1)
    addresses = ",".join([*replicas.grpc_addresses, f"127.0.0.1:{dead}"])
    api = {"Apis": {"work": {"Model": "work", "Inputs": {"x": {"Tensor": "X"}}, "Outputs": {"Y": "ys"}}}}
    with running_gateway(tmp_path, addresses, replace=("Apis",), **api) as gateway:
        answers = [call(gateway, "work", signed({"x": [float(i)]}))[1]["code"] for i in range(12)]
        log = gateway.log.read_text()
    assert answers == [0] * 12
    assert log.count(f"127.0.0.1:{dead} not reachable now") == 1
