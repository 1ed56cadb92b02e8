"""``toolkit gateway``: go-infer's REST API (signed envelopes, numbered codes) in front of Triton."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.command()
@click.option("--settings", "settings_file", type=click.Path(path_type=Path), default=Path("gateway.yaml"),
              show_default=True, help="Gateway settings (go-infer's settings.yaml API section and more).")
@click.option("--triton", "triton_url", default=None, help="Triton's gRPC host:port (overrides Triton.Url).")
@click.option("--host", default=None, help="Address to bind (overrides API.Addr).")
@click.option("--port", type=int, default=None, help="Port to listen on (overrides API.Port).")
@click.option("--admin-header", default=None, metavar="KEY=VALUE", envvar="TOOLKIT_RESTRICT_APIS",
              help="The KEY=VALUE Triton was started with (`toolkit serve --restrict-apis`), for API discovery "
                   "(overrides Triton.AdminHeader; also read from $TOOLKIT_RESTRICT_APIS).")
def gateway(settings_file: Path, triton_url: str | None, host: str | None, port: int | None,
            admin_header: str | None) -> None:
    """Serve POST /api/<path> for every model with an api_path, as go-infer's HTTP server did."""
    from toolkit.gateway import discover_routes, load_settings, run_gateway
    from toolkit.gateway.settings import with_overrides

    settings = with_overrides(load_settings(settings_file), addr=host, port=port, triton_url=triton_url,
                              admin_header=admin_header)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    routes = discover_routes(settings)
    click.echo(f"Gateway on http://{settings.api.addr}:{settings.api.port} -> Triton {settings.triton.url}")
    for route in routes.values():
        click.echo(f"  POST /api/{route.path:<20} -> {route.model}")
    stopped_by = run_gateway(settings, routes, settings_file=settings_file)
    click.echo(f"Gateway stopped{f' ({stopped_by})' if stopped_by else ''}.")
