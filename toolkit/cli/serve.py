"""``toolkit serve``: one tritonserver (or ``--replicas N``) over a generated repository, with the
stub watchdog on, Triton's log in a file, and an exit status that says whether the stop was clean."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import click

from toolkit.errors import ToolkitError


@click.command()
@click.option("--repository", type=click.Path(path_type=Path), default=Path("build/model_repository"),
              show_default=True, help="The Triton model repository to serve (what gen-repo wrote).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; 0.0.0.0 exposes the server to the network.")
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--grpc-port", type=int, default=8001, show_default=True)
@click.option("--metrics-port", type=int, default=8002, show_default=True)
@click.option("--model-control", type=click.Choice(["explicit", "none", "poll"]), default="explicit",
              show_default=True,
              help="Triton's model-control mode. explicit (every model, or --load-model, loaded at start) lets "
                   "the toolkit reload a model whose python stub died; none and poll only watch.")
@click.option("--load-model", "load_models", multiple=True,
              help="Load only these models at start (repeatable; needs --model-control explicit).")
@click.option("--log-file", type=click.Path(path_type=Path), default=None,
              help="Where tritonserver's log goes [default: tritonserver.log beside the repository].")
@click.option("--log-verbose", type=int, default=0, show_default=True)
@click.option("--timeout", type=float, default=180.0, show_default=True,
              help="Seconds to wait for every model to load.")
@click.option("--restrict-apis", "restrict", default=None, metavar="KEY=VALUE", envvar="TOOLKIT_RESTRICT_APIS",
              help="Answer model-repository, shared-memory, logging and trace requests (HTTP and gRPC) only "
                   "when they carry header KEY: VALUE (gRPC: triton-grpc-protocol-KEY). Also read from "
                   "$TOOLKIT_RESTRICT_APIS.")
@click.option("--no-self-heal", is_flag=True, help="Do not reload a model whose python stub died.")
@click.option("--replicas", type=int, default=1, show_default=True,
              help="Run N tritonservers over the repository on consecutive ports (HTTP = --http-port + 3 i, "
                   "gRPC + 1, metrics + 2), restart one that dies, and print the address list for "
                   "`toolkit gateway --triton` / `toolkit infer --url` (gRPC balances them).")
def serve(repository: Path, host: str, http_port: int, grpc_port: int, metrics_port: int,
          model_control: str, load_models: tuple[str, ...], log_file: Path | None, log_verbose: int,
          timeout: float, restrict: str | None, no_self_heal: bool, replicas: int) -> None:
    """Serve a model repository on the tritonserver bundled with nvidia-pytriton.

    A python stub that dies (OOM kill, native crash) is noticed within a tenth of a second and its
    model reloaded; readiness says "not ready" while a model cannot serve; a model that keeps
    crashing is marked failed (unloaded). A tritonserver that dies is started again on its ports.
    The exit status is non-zero when tritonserver could not drain and had to be killed.
    """
    from toolkit.server import ApiRestriction, TritonServer, check_repository

    if replicas < 1:
        raise ToolkitError(f"--replicas must be at least 1, got {replicas}")
    models = check_repository(repository, model_control=model_control, load_models=load_models)  # type: ignore[arg-type]
    log_file = log_file or repository.absolute().parent / "tritonserver.log"

    def event(message: str) -> None:
        click.echo(f"{time.strftime('%H:%M:%S')} {message}", err=True)

    if replicas > 1:
        _serve_replicas(repository, replicas, host=host, http_port=http_port, log_dir=log_file.parent, timeout=timeout,
                        on_event=event, server_options={
                            "model_control": model_control, "load_models": load_models,
                            "log_verbose": log_verbose, "self_heal": not no_self_heal,
                            "restrict_apis": ApiRestriction.parse(restrict) if restrict else None})
        return

    server = TritonServer(repository, host=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_port=metrics_port, model_control=model_control,  # type: ignore[arg-type]
                          load_models=load_models, log_file=log_file, log_verbose=log_verbose,
                          restrict_apis=ApiRestriction.parse(restrict) if restrict else None,
                          self_heal=not no_self_heal, on_event=event)
    stopping = []

    def request_stop(signum, _frame):
        stopping.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, request_stop)
    click.echo(f"Starting tritonserver with {len(models)} model(s) (log: {log_file}) ...", err=True)
    try:
        server.start(timeout=timeout)
        click.echo(f"Triton is ready with {', '.join(server.ready_models()) or 'no model'}")
        click.echo(f"  HTTP     http://{server.http_url}/v2")
        click.echo(f"  gRPC     {server.grpc_url}")
        click.echo(f"  metrics  {server.metrics_url}")
        click.echo(f"  log      {log_file}")
        healing = "on" if server.self_heal else f"off (--model-control {model_control})" \
            if not no_self_heal else "off (--no-self-heal)"
        click.echo(f"  self-healing stubs: {healing}")
        click.echo("Press Ctrl-C to stop.")
        code = server.wait()   # a crash the supervisor heals is not the end
        why = server.watchdog.gave_up if server.watchdog is not None else None
        raise ToolkitError(f"tritonserver exited unexpectedly with code {code}"
                           f"{f' and was not started again ({why})' if why else ''} (see its log: {log_file})")
    except KeyboardInterrupt:
        click.echo("Stopping: letting in-flight requests finish ...", err=True)
        code = server.stop()
        if server.stop_problem:
            raise ToolkitError(server.stop_problem) from None
        click.echo(f"tritonserver stopped (exit code {code})", err=True)
    finally:
        server.stop()


def _serve_replicas(repository: Path, count: int, *, host: str, http_port: int, log_dir: Path, timeout: float,
                    on_event, server_options: dict) -> None:
    from toolkit.server.replicas import ReplicaSet

    replicas = ReplicaSet(repository, count, host=host, http_port=http_port, on_event=on_event, log_dir=log_dir,
                          server_options=server_options)
    signal.signal(signal.SIGTERM, lambda *_: replicas.request_stop())
    click.echo(f"Starting {count} tritonservers (logs: {log_dir}/tritonserver-<i>.log) ...", err=True)
    replicas.start(timeout=timeout)
    click.echo(f"{count} Triton replicas are ready with {', '.join(replicas.servers[0].ready_models())}")
    for i, server in enumerate(replicas.servers):
        click.echo(f"  replica {i}: HTTP http://{server.http_url}/v2  gRPC {server.grpc_url}  "
                   f"metrics {server.metrics_url}")
    click.echo(f"  gRPC addresses (balanced by gRPC): {','.join(replicas.grpc_addresses)}")
    click.echo("Press Ctrl-C to stop.")
    with contextlib.suppress(KeyboardInterrupt):
        replicas.wait()
    click.echo("Stopping: letting in-flight requests finish ...", err=True)
    problems = replicas.stop()   # includes the replicas a supervisor gave up on
    if problems:
        raise ToolkitError("; ".join(problems))
    click.echo(f"{count} tritonservers stopped", err=True)
