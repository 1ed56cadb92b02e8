"""A go-infer compatible REST gateway in front of Triton (``toolkit gateway``).

go-infer's clients ``POST /api/<path>`` a signed JSON envelope and get an envelope back with
numbered error codes; Triton speaks KServe v2. The gateway keeps every go-infer client working
while the models run in Triton:

    settings.py   the YAML settings (go-infer's API section + Triton, Apis, Endpoints, ErrCode)
    signing.py    the string to sign, SHA256, SM2 with SM3 (gmssl)
    auth.py       checking a request in go-infer's order, off the event loop; replay; rate limits
    fairness.py   what one client address may have pending; check lanes served round-robin
    connections.py  uvicorn's h11 protocol with a header timeout and a per-address connection cap
    variants.py   endpoints split between weighted variants (canaries), sticky by a request field
    metrics.py    the gateway's own Prometheus metrics (GET /metrics)
    envelope.py   response envelope, request ids, codes
    body.py       a request's body: read, inflate, parse as Go does; printable log values
    mapping.py    API discovery from Triton; JSON data <-> tensors
    app.py        the Starlette app and its asyncio gRPC connection to Triton

    settings = load_settings(Path("gateway.yaml"))
    run_gateway(settings)                       # discovers the APIs, then serves with uvicorn

Imports: ``toolkit.client`` (failures, retry, balancing), the stub side's codes
(``toolkit.runtime.codes``) and ``toolkit.errors``; only the CLI imports the gateway.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from toolkit.gateway.mapping import ApiRoute, discover_routes
from toolkit.gateway.settings import GatewaySettings, load_settings

__all__ = ["ApiRoute", "GatewaySettings", "discover_routes", "load_settings", "run_gateway"]


def run_gateway(settings: GatewaySettings, routes: Mapping[str, ApiRoute] | None = None,
                settings_file: Path | None = None) -> str | None:
    """Serve until SIGINT/SIGTERM (uvicorn lets in-flight requests finish); returns the name of the
    signal that stopped it. ``routes`` default to what Triton at ``settings.triton.url`` exposes;
    an unreachable Triton raises ``GatewayError``. With ``settings_file``, endpoint weights follow
    the file without a restart."""
    import signal

    import uvicorn

    from toolkit.gateway.app import create_app
    from toolkit.gateway.connections import ACCEPT_BATCH, GatewayServer, guarded_protocol

    routes = discover_routes(settings) if routes is None else routes
    app = create_app(settings, routes, settings_file=settings_file)
    api = settings.api
    config = uvicorn.Config(app, host=api.addr, port=api.port, access_log=False,
                            lifespan="on", log_level="info", timeout_graceful_shutdown=30,
                            # uvicorn's h11 protocol with a header timeout and a per-address cap
                            # (connections.py); connections beyond MaxConnections get 503; a
                            # request's headers must fit in 64 KiB (the body has its own limits).
                            http=guarded_protocol(api.header_timeout, api.max_connections_per_client,
                                                  settings.err_code),
                            limit_concurrency=api.max_connections, timeout_keep_alive=api.keep_alive_timeout,
                            h11_max_incomplete_event_size=64 * 1024, backlog=ACCEPT_BATCH,
                            # No WebSockets: an upgrade would hand the connection to a protocol
                            # that does not keep the per-address count.
                            ws="none")
    # uvicorn raises the signal that stopped it again once it has shut down, which made Ctrl-C end
    # a clean shutdown in KeyboardInterrupt ("Aborted!", exit 1). The handlers it restores, and so
    # calls, are these: they note the signal and the gateway returns normally.
    stopped_by: list[str] = []
    handlers = {sig: signal.signal(sig, lambda number, _frame: stopped_by.append(signal.Signals(number).name))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        GatewayServer(config).run()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return stopped_by[0] if stopped_by else None
