"""A go-infer compatible REST gateway in front of Triton (``toolkit gateway``).

go-infer's clients ``POST /api/<path>`` a signed JSON envelope and get an envelope back with
numbered error codes; Triton speaks KServe v2. The gateway keeps every go-infer client working
while the models run in Triton:

    settings.py   the YAML settings (go-infer's API section + Triton, Apis, Endpoints, ErrCode)
    signing.py    the string to sign, SHA256, SM2 with SM3 (gmssl)
    auth.py       checking a request in go-infer's order, off the event loop; replay; rate limits
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
                settings_file: Path | None = None) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn lets in-flight requests finish). ``routes`` default to
    what Triton at ``settings.triton.url`` exposes; an unreachable Triton raises ``GatewayError``.
    With ``settings_file``, endpoint weights follow the file without a restart."""
    import uvicorn

    from toolkit.gateway.app import create_app

    routes = discover_routes(settings) if routes is None else routes
    app = create_app(settings, routes, settings_file=settings_file)
    config = uvicorn.Config(app, host=settings.api.addr, port=settings.api.port, access_log=False,
                            lifespan="on", log_level="info", timeout_graceful_shutdown=30,
                            # Connections beyond the cap get 503; idle keep-alives close after 5 s;
                            # a request's headers must fit in 64 KiB (the body has its own limits).
                            limit_concurrency=settings.api.max_connections, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024)
    uvicorn.Server(config).run()
