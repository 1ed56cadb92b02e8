"""Connection limits an anonymous client cannot turn against others: nginx's
``client_header_timeout`` and ``limit_conn``, on uvicorn's own h11 protocol.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps open connections
(``limit_concurrency``), but counts a connection that never sends a byte towards that cap forever:
255 idle sockets from one address made it answer 503 to everybody. Two limits are missing, and
this subclass of its ``H11Protocol`` adds them, nothing else:

- ``HeaderTimeout``: a request line and headers must arrive whole within this many seconds of the
  connection opening (or of the previous answer); otherwise the connection is closed, with a 408
  envelope when part of a request had arrived. A client trickling one header line every 2 s, or
  sending nothing, holds a connection for at most this long.
- ``MaxConnectionsPerClient``: connections from one client address beyond this are answered 503
  (9996) and closed at once, so one address can never fill ``MaxConnections``, which every other
  client shares.

Both act in the event loop's callbacks: no extra task or thread per connection. A connection over
its address's cap is refused at ``accept`` (``_Acceptor``, in place of asyncio's accept reader),
before asyncio makes a task, transport and protocol for it: 52 µs of the gateway's CPU for each
refused connection instead of 106 (1,000-connection bursts, kernel time included).

Refusing is cheap, but a burst is not free: asyncio accepts up to ``backlog`` connections at each
turn of the loop and sets each one up before anything else runs, so 1,000 connections opened at
once stalled every other client for ~200 ms. ``GatewayServer`` has uvicorn accept ``ACCEPT_BATCH``
(32) per turn (its ``backlog``), then raises the kernel's queue of pending connections back to
``LISTEN_BACKLOG`` (``listen()`` again), so a burst waits in the kernel, not in front of the
others, and no client's connection is dropped for a short queue: the longest stall measured
beside 1,000-connection bursts went from 238 ms to 29 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections import Counter
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from toolkit.gateway.envelope import envelope, new_request_id, render

#: Connections accepted per turn of the event loop (uvicorn's ``backlog``).
ACCEPT_BATCH = 32
#: Connections the kernel may hold for the gateway to accept (uvicorn's default backlog).
LISTEN_BACKLOG = 2048
#: Where a pre-rendered answer's request id goes (as long as one: the date and 32 hex digits).
_ID_SLOT = b"@" * len(new_request_id())


class GatewayServer(uvicorn.Server):
    """uvicorn's server, accepting in batches of ``config.backlog`` from a kernel queue of
    ``LISTEN_BACKLOG`` (see the module's docstring)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self._acceptors: list[_Acceptor] = []
        loop = asyncio.get_running_loop()
        protocol = self.config.http_protocol_class
        for server in getattr(self, "servers", []):
            for listening in server.sockets:
                with socket.socket(fileno=os.dup(listening.fileno())) as same:  # the same socket, another fd
                    same.listen(max(LISTEN_BACKLOG, self.config.backlog))
                if isinstance(protocol, type) and issubclass(protocol, GuardedH11Protocol):
                    acceptor = _Acceptor(loop, listening, server, protocol, self.server_state.connections,
                                         self.config.limit_concurrency)
                    acceptor.start()
                    self._acceptors.append(acceptor)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for acceptor in getattr(self, "_acceptors", []):  # no new connection from here on
            acceptor.close()
        await super().shutdown(sockets)


class _Acceptor:
    """Accepts for one listening socket in place of asyncio's own reader, refusing a connection over
    its address's cap, or over ``MaxConnections``, with a raw ``send`` of a 503 envelope and ``close``:
    no task, transport or protocol is made for it (half the ~100 µs each costs on asyncio's path),
    and the answer is the gateway's envelope, not uvicorn's plain-text 503. Every other connection
    goes to asyncio's ``connect_accepted_socket`` with the server's protocol, as asyncio would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listening: Any, server: Any,
                 protocol: type[GuardedH11Protocol], connections: Any, limit: int | None) -> None:
        self.loop, self.protocol, self.connections, self.limit = loop, protocol, connections, limit
        self.factory = server._protocol_factory  # uvicorn's partial(http_protocol_class, config=...)
        self.ssl = getattr(server, "_ssl_context", None)
        self.fd = listening.fileno()
        self.sock = socket.socket(fileno=os.dup(self.fd))  # accept() through a socket object of ours
        self.sock.setblocking(False)
        # The answer rendered once; each refusal gets its own request id in the slot.
        self.refusal = _raw_answer(503, "Service Unavailable", protocol.unavailable,
                                   "too many connections from your address, retry later", _ID_SLOT.decode())
        self.full = _raw_answer(503, "Service Unavailable", protocol.unavailable,
                                "the gateway is at its connection limit, retry later", _ID_SLOT.decode())

    def start(self) -> None:
        self.loop.remove_reader(self.fd)  # asyncio's own accept; uvicorn's shutdown removes ours
        self.loop.add_reader(self.fd, self.accept)

    def accept(self) -> None:
        counts, cap = self.protocol.open_by_client, self.protocol.max_per_client
        for _ in range(ACCEPT_BATCH):
            try:
                conn, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors (EMFILE) or the socket closed: asyncio's pause
                self.loop.remove_reader(self.fd)
                self.loop.call_later(1.0, self._resume)
                return
            address = peer[0] if isinstance(peer, tuple) else ""
            conn.setblocking(False)
            over = counts[address] >= cap
            if over or (self.limit is not None and len(self.connections) >= self.limit):
                with contextlib.suppress(OSError):
                    conn.send((self.refusal if over else self.full).replace(_ID_SLOT, new_request_id().encode()))
                conn.close()
                if not counts[address]:
                    del counts[address]
                continue
            self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn, ssl=self.ssl))

    def close(self) -> None:
        """Stop accepting and close our descriptor of the listening socket (uvicorn closes its own)."""
        with contextlib.suppress(OSError, ValueError):
            self.loop.remove_reader(self.fd)
        self.sock.close()

    def _resume(self) -> None:
        if self.sock.fileno() >= 0:
            with contextlib.suppress(OSError, ValueError):
                self.loop.add_reader(self.fd, self.accept)


def _raw_answer(status: int, reason: str, code: int, message: str, request_id: str | None = None) -> bytes:
    """A whole HTTP/1.1 answer carrying an envelope, for a connection no request cycle owns."""
    body = render(envelope("", request_id or new_request_id(), code, msg=message))
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n" + ("retry-after: 1\r\n" if status == 503 else "") + "\r\n")
    return head.encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a per-address connection cap. Configure a
    subclass with :func:`guarded_protocol`; the counts are shared by the subclass's connections."""

    header_timeout: float = 10.0
    max_per_client: int = 64
    missing_parameter: int = 9801
    unavailable: int = 9996
    open_by_client: Counter[str]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._address = peer[0] if isinstance(peer, tuple) else ""
        self._header_timer: asyncio.TimerHandle | None = None
        self.open_by_client[self._address] += 1
        self._refused = self.open_by_client[self._address] > self.max_per_client
        if self._refused:
            # Answered and closed before uvicorn sees it: never in its count towards MaxConnections
            # (an accept burst of 1,000 made everyone's 503 while they waited for connection_lost),
            # and as little work as an answer can be (a burst is handled in one go on the loop).
            self.transport = transport
            transport.write(_raw_answer(503, "Service Unavailable", self.unavailable,
                                        "too many connections from your address, retry later"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self.open_by_client[self._address] -= 1
        if self.open_by_client[self._address] <= 0:
            del self.open_by_client[self._address]
        if self._refused:
            return
        self._cancel_header_timer()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's headers get their own time
            self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request arrived: say why it is dropped
            self.transport.write(_raw_answer(408, "Request Timeout", self.missing_parameter,
                                             f"request headers not received within {self.header_timeout:g}s"))
        self.transport.close()


def guarded_protocol(header_timeout: float, max_per_client: int, codes: Any) -> type[GuardedH11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these limits and its own counts."""
    return type("GatewayH11Protocol", (GuardedH11Protocol,), {
        "header_timeout": header_timeout, "max_per_client": max_per_client,
        "missing_parameter": codes.missing_parameter, "unavailable": codes.unavailable,
        "open_by_client": Counter()})
