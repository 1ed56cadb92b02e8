"""Work whose caller gave up is dropped, not done: the caller's deadline travels with the request
(tritonclient's timeout -> Triton's request timeout, through the ensemble to its steps), so an
overload does not leave a long tail behind it.

The fault: 24 clients flood a 5-requests-per-second model through an ensemble for 4 s, each giving
up after 1 s. Without the deadline Triton would work off the whole backlog (~90 requests, ~18 s)
after the flood ended; with it the backlog expires in the queue and the next request is served at once.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from bounded import Background
from projects import write_ensemble, write_model
from serving import free_ports, infer_outcome

from toolkit.client import TritonClient
from toolkit.hooks import QUEUE_TIMEOUT, UNAVAILABLE
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer

#: Each test took 10 s (teardown included) on a busy 2-core VM.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.reliability, pytest.mark.timeout(60)]

SLOW_HOOK = '''
import time

from toolkit.hooks import Hook


class Slow(Hook):
    def infer(self, batch):
        time.sleep(0.2)
        return {"Y": batch["X"]}
'''
CLIENTS, FLOOD_SECONDS, DEADLINE = 24, 4.0, 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("deadlines")
    write_model(root, "slow", {
        "kind": "python", "hook": "slow:Slow", "max_batch_size": 1,
        "inputs": [{"name": "X", "dtype": "FP32", "dims": [1]}],
        "outputs": [{"name": "Y", "dtype": "FP32", "dims": [1]}],
        # A long default (30 s) that only a caller's shorter deadline can cut.
        "dynamic_batching": {"default_queue_policy": {"timeout_action": "REJECT",
                                                      "default_timeout_microseconds": 30_000_000,
                                                      "allow_timeout_override": True,
                                                      "max_queue_size": 1000}},
    }, files={"slow.py": SLOW_HOOK})
    write_ensemble(root, "slowpipe", {
        "max_batch_size": 1,
        "inputs": [{"name": "X", "dtype": "FP32", "dims": [1]}],
        "outputs": [{"name": "Y", "dtype": "FP32", "dims": [1]}],
        "steps": [{"model": "slow", "inputs": {"X": "X"}, "outputs": {"Y": "Y"}}],
    })
    repository = generate_repository(load_project(root / "models", root / "ensembles"), root / "repo").path
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as server:
        yield server


def executions(client: TritonClient) -> int:
    return int(client.statistics("slow")["inference_stats"]["success"].get("count", 0))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_requests_whose_callers_gave_up_are_dropped_and_leave_no_tail(server, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    x = np.array([[1.0]], dtype=np.float32)

    def flood(client: TritonClient) -> str:
        return infer_outcome(client, "slowpipe", {"X": x})

    with TritonClient(url, protocol=protocol, timeout=30, retries=0) as probe:
        executed_before = executions(probe)
        with Background(seconds=FLOOD_SECONDS + 30, join_timeout=DEADLINE + 20, name="flood") as load:
            load.loop(flood, threads=CLIENTS,
                      context=lambda: TritonClient(url, protocol=protocol, timeout=DEADLINE, retries=0))
            load.sleep(FLOOD_SECONDS)
        outcomes = load.counts
        started = time.monotonic()
        probe.infer("slowpipe", {"X": x})
        probe_seconds = time.monotonic() - started
        time.sleep(DEADLINE)  # anything still queued has expired by now
        executed = executions(probe) - executed_before - 1

    sent = sum(outcomes.values())
    # Every failure is a timeout (the caller's deadline), never a broken model.
    assert set(outcomes) <= {"answered", f"failed {QUEUE_TIMEOUT}", f"failed {UNAVAILABLE}"}, outcomes
    assert outcomes[f"failed {QUEUE_TIMEOUT}"] > outcomes["answered"], outcomes
    # The model ran about what its capacity allowed during the flood (5/s), not the backlog.
    assert executed <= FLOOD_SECONDS * 5 + CLIENTS, (executed, outcomes)
    assert executed < sent / 2, (executed, sent)
    # The next request after the flood waited for at most what was running, not ~18 s of backlog.
    assert probe_seconds < 3, probe_seconds
    print(f"\n{protocol}: sent {sent} ({dict(outcomes)}), executed {executed}, "
          f"next request served in {probe_seconds:.2f}s")
