"""Fair checking without processes: the per-address budget and a lane's round-robin over a thread
pool. tests/reliability/test_gateway_hostile.py measures it on the real gateway under forged bodies."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from toolkit.gateway.fairness import ClientBudget, FairLane

pytestmark = pytest.mark.timeout(30)


def test_a_client_budget_refuses_beyond_its_requests_or_bytes_and_spares_other_addresses():
    budget = ClientBudget(max_requests=3, max_bytes=100)
    assert [budget.reserve("a", 30) for _ in range(4)] == [True, True, True, False]   # 4th: requests
    assert budget.reserve("b", 100) and not budget.reserve("b", 1)                    # bytes
    budget.release("a", 30)
    assert budget.reserve("a", 10) and budget.pending("a") == (3, 70)
    budget.resize("a", 10, 40)
    assert not budget.reserve("a", 1) and budget.pending("a") == (3, 100)
    for size in (30, 30, 40):
        budget.release("a", size)
    assert budget.pending("a") == (0, 0)


def test_a_lane_keeps_a_worker_for_other_addresses_and_serves_them_in_turn():
    release = threading.Event()
    order: list[str] = []

    def job(name: str, block: bool) -> str:
        order.append(f"start {name}")
        if block:
            assert release.wait(10), "never released"
        return name

    async def scenario() -> tuple[list[str], list[str]]:
        with ThreadPoolExecutor(2) as pool:
            lane = FairLane(pool, 2)
            flood = [asyncio.create_task(lane.run("attacker", job, f"a{i}", True)) for i in range(5)]
            await asyncio.sleep(0.2)
            # The attacker holds one of the two workers, whatever it queued: b0 and b1 run at once.
            served = [await asyncio.wait_for(lane.run("other", job, f"b{i}", False), 5) for i in range(2)]
            release.set()
            return served, await asyncio.gather(*flood)

    served, flooded = asyncio.run(scenario())
    assert served == ["b0", "b1"] and flooded == [f"a{i}" for i in range(5)]
    assert order[:3] == ["start a0", "start b0", "start b1"], order


def test_a_lane_alternates_between_waiting_addresses():
    started: list[str] = []
    release = threading.Event()

    def job(name: str) -> None:
        started.append(name)
        if name == "x":
            assert release.wait(10), "never released"

    async def scenario() -> None:
        with ThreadPoolExecutor(1) as pool:
            lane = FairLane(pool, 1)
            blocker = asyncio.create_task(lane.run("x", job, "x"))
            await asyncio.sleep(0.1)
            jobs = [asyncio.create_task(lane.run("a", job, f"a{i}")) for i in range(3)]   # a queues 3 first
            jobs += [asyncio.create_task(lane.run("b", job, f"b{i}")) for i in range(3)]
            await asyncio.sleep(0.1)
            release.set()
            await asyncio.gather(blocker, *jobs)

    asyncio.run(scenario())
    assert started == ["x", "a0", "b0", "a1", "b1", "a2", "b2"], started
