"""Several embedded tritonservers over one repository, for local use and tests (``toolkit serve
--replicas N``): go-infer's several HTTP servers behind nginx, with gRPC's own balancing in front
(``toolkit/balancing.py``) instead of nginx.

Replica i listens on ``base + 3 i`` (HTTP), ``+1`` (gRPC), ``+2`` (metrics). A replica that dies
(killed, crashed) is started again on the same ports by a supervisor thread, so the clients' gRPC
channels reconnect to it by themselves. On a real deployment each replica is a pod and Kubernetes
does this (see ``toolkit package``); on one machine the replicas share its cores (no speed-up).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.errors import ServerError
from toolkit.server import TritonServer


@dataclass
class Restart:
    replica: int
    code: int | None
    seconds: float   # from noticing the death until the replica was ready again
    error: str | None = None


@dataclass
class ReplicaSet:
    repository: Path
    count: int
    host: str = "127.0.0.1"
    http_port: int = 8000
    on_event: Callable[[str], None] | None = None
    log_dir: Path | None = None
    server_options: dict[str, Any] = field(default_factory=dict)
    servers: list[TritonServer] = field(default_factory=list, init=False)
    restarts: list[Restart] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ServerError(f"--replicas must be at least 1, got {self.count}")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _server(self, i: int) -> TritonServer:
        base = self.http_port + 3 * i
        log = (self.log_dir / f"tritonserver-{i}.log") if self.log_dir else None
        events = self.on_event

        def event(message: str) -> None:
            if events is not None:
                events(f"replica {i}: {message}")

        return TritonServer(self.repository, host=self.host, http_port=base, grpc_port=base + 1,
                            metrics_port=base + 2, log_file=log, on_event=event, restart_on_crash=False,
                            **self.server_options)

    @property
    def grpc_addresses(self) -> list[str]:
        return [s.grpc_url for s in self.servers]

    @property
    def http_addresses(self) -> list[str]:
        return [s.http_url for s in self.servers]

    def start(self, timeout: float = 180.0) -> ReplicaSet:
        try:
            for i in range(self.count):
                server = self._server(i)
                self.servers.append(server)
                server.start(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        self._thread = threading.Thread(target=self._supervise, args=(timeout,), name="toolkit-replicas",
                                        daemon=True)
        self._thread.start()
        return self

    def _supervise(self, timeout: float) -> None:
        while not self._stop.wait(0.2):
            for i, server in enumerate(self.servers):
                if self._stop.is_set() or server.process is None or server.process.poll() is None:
                    continue
                code = server.process.returncode
                self._event(f"replica {i} ({server.grpc_url}) exited with code {code}; restarting it")
                noticed = time.monotonic()
                server.stop()  # sweeps its stubs and shared memory
                replacement = self._server(i)
                try:
                    replacement.start(timeout=timeout)
                except Exception as e:
                    self.restarts.append(Restart(i, code, time.monotonic() - noticed, str(e)))
                    self._event(f"replica {i} could not be restarted: {e}; trying again")
                    continue
                self.servers[i] = replacement
                took = time.monotonic() - noticed
                self.restarts.append(Restart(i, code, took))
                self._event(f"replica {i} serving again after {took:.1f}s")

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def request_stop(self) -> None:
        """Make ``wait`` return (safe from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        """Until ``stop`` (the supervisor keeps the replicas up meanwhile)."""
        self._stop.wait()

    def stop(self) -> list[str]:
        """Stop every replica; the problems of those that did not stop cleanly."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=240)
            self._thread = None
        problems = []
        for i, server in enumerate(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
            if server.stop_problem:
                problems.append(f"replica {i}: {server.stop_problem}")
        return problems

    def __enter__(self) -> ReplicaSet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
