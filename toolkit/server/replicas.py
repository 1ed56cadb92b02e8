"""Several embedded tritonservers over one repository, for local use and tests (``toolkit serve
--replicas N``): go-infer's several HTTP servers behind nginx, with gRPC's own balancing in front
(``toolkit/client/balancing.py``) instead of nginx.

Replica i listens on ``base + 3 i`` (HTTP), ``+1`` (gRPC), ``+2`` (metrics). Each replica has the
same supervisor as a single server (``toolkit/server/supervisor.py``): a stub that dies is healed, and a
replica that dies (killed, crashed) is started again on the same ports, so the clients' gRPC
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
from toolkit.server.process import TritonServer


@dataclass
class Restart:
    replica: int
    reason: str      # "exit code -9", or why a wedged server was restarted
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

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ServerError(f"--replicas must be at least 1, got {self.count}")
        self._stop = threading.Event()

    def _server(self, i: int) -> TritonServer:
        base = self.http_port + 3 * i
        log = (self.log_dir / f"tritonserver-{i}.log") if self.log_dir else None
        events = self.on_event

        def event(message: str) -> None:
            if events is not None:
                events(f"replica {i}: {message}")

        return TritonServer(self.repository, host=self.host, http_port=base, grpc_port=base + 1,
                            metrics_port=base + 2, log_file=log, on_event=event,
                            **self.server_options)

    @property
    def grpc_addresses(self) -> list[str]:
        return [s.grpc_url for s in self.servers]

    @property
    def http_addresses(self) -> list[str]:
        return [s.http_url for s in self.servers]

    def start(self, timeout: float = 180.0) -> ReplicaSet:
        """Start the replicas one after the other (they share the cores), saying as each starts and
        as each is ready: N replicas take N model loads, and a silent minute looks hung."""
        try:
            for i in range(self.count):
                server = self._server(i)
                self.servers.append(server)
                self._event(f"replica {i}: starting ({i + 1} of {self.count}; HTTP {server.http_url}, "
                            f"gRPC {server.grpc_url})")
                started = time.monotonic()
                server.start(timeout=timeout)
                self._event(f"replica {i}: ready after {time.monotonic() - started:.1f}s "
                            f"({i + 1} of {self.count} ready)")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def restarts(self) -> list[Restart]:
        """Every restart of a replica's tritonserver by its supervisor, replica by replica."""
        out = []
        for i, server in enumerate(self.servers):
            supervisor = server.watchdog
            for heal in list(supervisor.heals) if supervisor is not None else []:
                if heal.action == "server-restart":
                    out.append(Restart(i, heal.instances[0] if heal.instances else "", heal.serving_after or 0.0,
                                       heal.error))
        return out

    def given_up(self) -> list[str]:
        """The replicas whose supervisor gave up on them (dead and not started again), with why."""
        return [f"replica {i}: {s.watchdog.gave_up}" for i, s in enumerate(self.servers)
                if s.watchdog is not None and s.watchdog.gave_up]

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def request_stop(self) -> None:
        """Make ``wait`` return (safe from a signal handler)."""
        self._stop.set()

    def wait(self) -> None:
        """Until ``stop``, or until a replica's supervisor gives up on it (each supervisor keeps its
        replica up meanwhile)."""
        while not self._stop.wait(0.5) and not self.given_up():
            pass

    def stop(self) -> list[str]:
        """Stop every replica; the problems of those that did not stop cleanly."""
        self._stop.set()
        problems = self.given_up()
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
