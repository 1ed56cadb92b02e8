"""The gateway's ASGI app: ``POST /api/<path>`` in go-infer's envelope, calling Triton over gRPC.

One request, in order: read the body (size limit, read timeout, gzip bodies decompressed under the
same limit), authenticate it off the event loop (``auth.py``: parse, go-infer's checks, signature,
replay, the app's rate limit), find the API or the endpoint variant (9709), map ``data`` to tensors
(9801), call Triton through the one shared asyncio gRPC channel with the API's deadline (sent to
Triton too, so it drops work whose caller gave up), retry a 9996 ("busy or restarting") with
backoff while the deadline allows (``toolkit/client/retry.py``), map the outputs back.

HTTP statuses: 200 for every envelope a client should read as go-infer's (success, bad input, a
hook's own code, 9998); 503 + Retry-After for "busy, retry" (9996) and timeouts (9997); 429 +
Retry-After for an app's rate limit (9810); 413 for a body over the limit, 408 for one that does
not arrive in time. An unexpected exception is logged with the request id and answered 9998, so no
traceback reaches a client and no worker dies; error texts never carry paths or internal
addresses; every value from the request is escaped before it is logged. Only ``GET /`` (liveness),
``GET /metrics`` and ``POST /api/...`` exist: none of Triton's own endpoints is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from toolkit.client.failures import classify_triton_error
from toolkit.client.retry import retry_pause
from toolkit.gateway.auth import Authenticator
from toolkit.gateway.body import ClientGone, printable, read_body
from toolkit.gateway.envelope import SUCCESS, RequestError, envelope, new_request_id, render
from toolkit.gateway.fairness import ClientBudget
from toolkit.gateway.mapping import ApiRoute, variant_key
from toolkit.gateway.metrics import GatewayMetrics
from toolkit.gateway.settings import ErrorCodes, GatewaySettings
from toolkit.gateway.variants import parse_endpoints
from toolkit.runtime.codes import API_ENTRY_FAILED, INFERENCE_FAILED, QUEUE_TIMEOUT, UNAVAILABLE

log = logging.getLogger("toolkit.gateway")


class Backend(Protocol):
    """Where inference happens: Triton in production, anything with this shape in a unit test."""

    async def start(self) -> None: ...

    async def infer(self, route: ApiRoute, tensors: Mapping[str, np.ndarray], timeout: float | None = None
                    ) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


class TritonBackend:
    """One tritonclient asyncio gRPC channel, reused by every request; several Triton replicas in
    ``url`` are balanced by gRPC itself (``toolkit/client/balancing.py``)."""

    def __init__(self, url: str, compression: str | None = None):
        self.url, self.compression = url, compression
        self._client: Any = None

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcaio  # the channel belongs to the running event loop

        from toolkit.client.balancing import channel_args, grpc_target

        self._client = grpcaio.InferenceServerClient(grpc_target(self.url), channel_args=channel_args(self.url))

    async def infer(self, route: ApiRoute, tensors: Mapping[str, np.ndarray], timeout: float | None = None
                    ) -> dict[str, np.ndarray]:
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in tensors.items():
            item = grpcaio.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [grpcaio.InferRequestedOutput(o.tensor) for o in route.outputs]
        deadline = route.timeout if timeout is None else timeout
        # The deadline travels to Triton as the request's timeout (microseconds): a request still
        # queued when the caller has given up is dropped there, not run.
        result = await self._client.infer(route.model, inputs, model_version=route.version, outputs=outputs,
                                          client_timeout=deadline, timeout=max(1, int(deadline * 1e6)),
                                          compression_algorithm=self.compression)
        return {o.tensor: result.as_numpy(o.tensor) for o in route.outputs}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def triton_error(error: Exception, codes: ErrorCodes, timeout: float, request_id: str = "") -> RequestError:
    """A failed Triton call as an envelope error: the hook's own code and message when it sent one;
    otherwise a plain message per class (Triton's own text stays in the gateway's log: it can name
    files and internal addresses)."""
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    message = message or type(error).__name__
    status = str(error.status()) if hasattr(error, "status") and callable(error.status) else ""
    code, text = classify_triton_error(message, status)
    if code == QUEUE_TIMEOUT:
        return RequestError(codes.queue_timeout, f"inference did not finish within {timeout:g}s", status=503)
    if code == UNAVAILABLE:
        return RequestError(codes.unavailable, "model busy or restarting, retry later", status=503)
    if code is None:
        return RequestError(codes.inference_failed, f"inference failed (request {request_id})")
    if code == INFERENCE_FAILED:
        return RequestError(codes.inference_failed, f"inference failed (request {request_id})")
    if code == API_ENTRY_FAILED:
        return RequestError(codes.api_entry_failed, f"the request could not be prepared (request {request_id})")
    return RequestError(code, text)  # the hook's own code: its message is meant for the client


@dataclass
class _Call:
    request_id: str
    app_id: str = ""  # echoed in the envelope once the signature is verified, as go-infer does
    variant: str = ""
    retries: int = 0


class Gateway:
    """The request pipeline, independent of the ASGI framework."""

    def __init__(self, settings: GatewaySettings, routes: Mapping[str, ApiRoute], backend: Backend):
        self.settings, self.routes, self.backend = settings, dict(routes), backend
        self.codes = settings.err_code
        self.auth = Authenticator(settings)
        self.budget = ClientBudget(settings.api.max_pending_checks_per_client,
                                   settings.api.max_pending_bytes_per_client)
        self.endpoints = parse_endpoints(settings.endpoints)
        self.metrics = GatewayMetrics()

    def reload_endpoints(self, settings: GatewaySettings) -> list[str]:
        """Take ``settings``' Endpoints (weights, stickiness, endpoints removed) without a restart, all
        or nothing: returns why not when a change needs routes not discovered at start (a new
        endpoint or variant, another model or version), applying nothing then."""
        endpoints = parse_endpoints(settings.endpoints)
        problems = []
        for path, endpoint in endpoints.items():
            for v in endpoint.variants:
                route = self.routes.get(variant_key(path, v.name))
                if route is None or route.model != v.model or route.version != v.version:
                    problems.append(f"Endpoints.{path}: variant '{v.name}' ({v.model}) was not routed at start")
        for path in sorted(set(self.endpoints) - set(endpoints)):
            if path not in self.routes:
                problems.append(f"Endpoints.{path} removed, but no single model serves /api/{path} without it")
        if not problems:
            self.endpoints = endpoints
        return problems

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        call, path, status = _Call(new_request_id()), request.path_params.get("path", ""), 200
        headers: dict[str, str] = {}
        try:
            data = await self._serve(request, path, call)
            body = envelope(call.app_id, call.request_id, SUCCESS, data)
        except ClientGone:
            log.info("%s POST /api/%s: client disconnected before its body arrived", call.request_id,
                     printable(path))
            self.metrics.observe(self._api_label(path), "", -1, time.perf_counter() - started)
            return Response(status_code=400)
        except RequestError as e:
            status = e.status
            body = envelope(call.app_id, call.request_id, e.code, msg=e.message)
            if e.status in (429, 503):
                headers["Retry-After"] = "1"
            if e.close:
                headers["Connection"] = "close"
        except Exception:
            log.exception("%s POST /api/%s failed unexpectedly", call.request_id, printable(path))
            body = envelope(call.app_id, call.request_id, self.codes.inference_failed,
                            msg=f"internal error (request {call.request_id})")
        try:
            content = render(body)
        except ValueError:  # an output JSON cannot carry; never a 500 without an envelope
            log.exception("%s POST /api/%s: answer not serialisable", call.request_id, printable(path))
            body = envelope(call.app_id, call.request_id, self.codes.inference_failed,
                            msg=f"internal error (request {call.request_id})")
            content = render(body)
        seconds = time.perf_counter() - started
        if call.variant:
            headers["X-Variant"] = call.variant
        log.info("%s POST /api/%s appId=%s%s code=%s%s %.1fms", call.request_id, printable(path),
                 printable(call.app_id or "-", 64), f" variant={call.variant}" if call.variant else "",
                 body["code"], f" retries={call.retries}" if call.retries else "", seconds * 1000)
        self.metrics.observe(self._api_label(path), call.variant, body["code"], seconds)
        return Response(content, status_code=status, media_type="application/json", headers=headers)

    def _api_label(self, path: str) -> str:
        return path if path in self.routes or path in self.endpoints else "-"

    async def _serve(self, request: Request, path: str, call: _Call) -> dict[str, Any]:
        api = self.settings.api
        client = request.client.host if request.client else ""
        declared = request.headers.get("content-length", "")
        # Reserved before the body is read: the declared size, or the most a body may be.
        reserved = int(declared) if declared.isdigit() and int(declared) <= api.max_body_bytes else api.max_body_bytes
        if not self.budget.reserve(client, reserved):
            raise RequestError(self.codes.unavailable, "too many requests from your address are being checked, "
                               "retry later", status=503, close=True)
        try:
            body = await read_body(request, api.max_body_bytes, self.codes, api.body_read_timeout)
            self.budget.resize(client, reserved, len(body))
            reserved = len(body)
            caller = await self.auth.authenticate(body, client)
        finally:
            self.budget.release(client, reserved)
        call.app_id = caller.app_id
        endpoint = self.endpoints.get(path)
        if endpoint is not None:
            variant = endpoint.choose(caller.fields)
            call.variant = variant.name
            route = self.routes[variant_key(path, variant.name)]
        else:
            route = self.routes.get(path)
        if route is None or "\0" in path:
            raise RequestError(self.codes.unknown_api_path, "unknown path")
        tensors, single = route.to_tensors(caller.data, self.codes.missing_parameter)
        outputs = await self._infer(route, tensors, call)
        data = route.to_data(outputs, single, self.codes.inference_failed)
        if call.variant:
            data["variant"] = call.variant
        return data

    async def _infer(self, route: ApiRoute, tensors: dict[str, np.ndarray], call: _Call) -> dict[str, np.ndarray]:
        """One inference, sent again after a 9996 while the route's deadline allows."""
        deadline = time.monotonic() + route.timeout
        attempt = 0
        while True:
            try:
                return await self.backend.infer(route, tensors, max(deadline - time.monotonic(), 0.001))
            except Exception as e:
                if not _is_triton_error(e):
                    raise
                error = triton_error(e, self.codes, route.timeout, call.request_id)
                if error.code != self.codes.unavailable:
                    if error.code in (self.codes.inference_failed, self.codes.api_entry_failed):
                        log.warning("%s %s: %s", call.request_id, route.model, printable(e, 500))
                    raise error from e
                pause = retry_pause(UNAVAILABLE, attempt, deadline - time.monotonic())
                if pause is None:
                    raise error from e
                attempt += 1
                call.retries = attempt
                self.metrics.retried(route.path)
                await asyncio.sleep(pause)


def _is_triton_error(error: Exception) -> bool:
    from tritonclient.utils import InferenceServerException

    return isinstance(error, InferenceServerException)


def create_app(settings: GatewaySettings, routes: Mapping[str, ApiRoute], *,
               backend: Backend | None = None, settings_file: Path | None = None) -> Starlette:
    """The ASGI app. ``backend`` defaults to Triton at ``settings.triton.url`` (connected at start-up).
    With ``settings_file``, endpoint weights are re-read from it whenever it changes."""
    gateway = Gateway(settings, routes, backend or TritonBackend(settings.triton.url, settings.triton.compression))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        gateway.auth.start()
        await gateway.auth.warm_up()
        await gateway.backend.start()
        watcher = asyncio.create_task(_watch_settings(gateway, settings_file)) if settings_file else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await gateway.backend.close()
            gateway.auth.close()

    async def liveness(_request: Request) -> Response:
        return PlainTextResponse("Hello world.")  # go-infer's answer on GET /

    async def metrics(_request: Request) -> Response:
        return Response(gateway.metrics.render(), media_type=gateway.metrics.content_type)

    app = Starlette(routes=[Route("/", liveness, methods=["GET"]),
                            Route("/metrics", metrics, methods=["GET"]),
                            Route("/api/{path:path}", gateway.handle, methods=["POST"])],
                    middleware=[Middleware(GZipMiddleware, minimum_size=1024)],
                    lifespan=lifespan)
    app.state.gateway = gateway
    return app


async def _watch_settings(gateway: Gateway, path: Path, interval: float = 1.0) -> None:
    """Apply a changed settings file when only what can change live changed (Endpoints: weights,
    stickiness, removals); otherwise keep the running settings and say why, in one log line."""
    from toolkit.errors import GatewayError
    from toolkit.gateway.settings import load_settings, restart_needed

    seen = path.stat().st_mtime_ns if path.exists() else 0
    try:  # what the file said at start, before the command line's overrides
        running = await asyncio.to_thread(load_settings, path)
    except GatewayError:
        running = gateway.settings
    while True:
        await asyncio.sleep(interval)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        if mtime == seen:
            continue
        seen = mtime
        try:
            settings = await asyncio.to_thread(load_settings, path)
        except GatewayError as e:
            log.warning("settings file changed but was not applied (the gateway keeps its running settings): %s",
                        "; ".join(line.strip() for line in str(e).splitlines()))
            continue
        problems = restart_needed(running, settings)
        problems += [] if problems else gateway.reload_endpoints(settings)
        if problems:
            log.warning("settings file changed but was not applied (the gateway keeps its running settings): %s",
                        "; ".join(problems))
            continue
        running = settings
        log.info("settings reloaded: endpoint weights %s",
                 {p: {v.name: v.weight for v in e.variants} for p, e in gateway.endpoints.items()} or "none")
