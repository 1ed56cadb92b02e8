"""Fair checking: what one client address can cost the others while requests are being checked.

Checking a request (parse, build the string to sign, verify) costs CPU in proportion to its body:
a forged 16 MB body of small numbers takes ~15 s of a worker before it is refused, a 300 KB one
~0.3 s. The address a request came from is the one thing about it a client cannot forge before
its signature is checked (an appId can be claimed by anyone, so a budget per claimed appId would
let an attacker spend a real app's share), so budgets are per client address:

- ``ClientBudget``: requests and body bytes an address has being read or checked at once
  (``MaxPendingChecksPerClient``, ``MaxPendingBytesPerClient``); beyond them its requests are
  answered 9996 (HTTP 503) at once, from the declared ``Content-Length`` before the body is read.
- ``FairLane``: one lane of check workers, served round-robin between addresses, and never more
  than ``workers - 1`` of them (at least one) busy with one address, so with two or more workers
  another address always finds one free. The gateway has a lane for small bodies and one for
  large ones, so no small check waits behind a large one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from typing import Any


class ClientBudget:
    """Requests and bytes each client address has pending; ``reserve`` refuses beyond the caps."""

    def __init__(self, max_requests: int, max_bytes: int):
        self.max_requests, self.max_bytes = max_requests, max_bytes
        self._requests: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()

    def reserve(self, client: str, size: int) -> bool:
        """Take one request of ``size`` bytes for ``client``; False (nothing taken) when over a cap."""
        if self._requests[client] >= self.max_requests or self._bytes[client] + size > self.max_bytes:
            return False
        self._requests[client] += 1
        self._bytes[client] += size
        return True

    def resize(self, client: str, old: int, new: int) -> None:
        """The body turned out to be ``new`` bytes, not the ``old`` reserved (gzip, no length)."""
        self._bytes[client] += new - old

    def release(self, client: str, size: int) -> None:
        self._requests[client] -= 1
        self._bytes[client] -= size
        if self._requests[client] <= 0:
            del self._requests[client], self._bytes[client]

    def pending(self, client: str) -> tuple[int, int]:
        return self._requests[client], self._bytes[client]


class FairLane:
    """Runs jobs on an executor of ``workers`` workers, round-robin between clients, at most
    ``max(1, workers - 1)`` of one client's at a time; the rest wait here, in order per client."""

    def __init__(self, executor: concurrent.futures.Executor, workers: int):
        self.executor, self.workers = executor, workers
        self.per_client = max(1, workers - 1)
        self._waiting: OrderedDict[str, deque[tuple[asyncio.Future, Callable[..., Any], tuple]]] = OrderedDict()
        self._running: Counter[str] = Counter()
        self._busy = 0

    async def run(self, client: str, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append((future, fn, args))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while self._busy < self.workers:
            client = next((c for c, q in self._waiting.items() if q and self._running[c] < self.per_client), None)
            if client is None:
                return
            queue = self._waiting.pop(client)
            future, fn, args = queue.popleft()
            # To the back, even when empty (until its jobs finish): its next job, queued now or
            # later, waits for every other client's.
            self._waiting[client] = queue
            if future.done():  # its request was cancelled while it waited
                continue
            self._busy += 1
            self._running[client] += 1
            job = loop.run_in_executor(self.executor, fn, *args)
            job.add_done_callback(lambda done, c=client, f=future: self._finished(c, f, done))

    def _finished(self, client: str, future: asyncio.Future, job: asyncio.Future) -> None:
        self._busy -= 1
        self._running[client] -= 1
        if self._running[client] <= 0:
            del self._running[client]
            if not self._waiting.get(client, True):
                del self._waiting[client]
        if not future.done():
            if job.cancelled():
                future.cancel()
            elif job.exception() is not None:
                future.set_exception(job.exception())  # type: ignore[arg-type]
            else:
                future.set_result(job.result())
        self._dispatch()
