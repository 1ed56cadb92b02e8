"""The gateway's ASGI app: ``POST /api/<path>`` in go-infer's envelope, calling Triton over gRPC.

One request, in order: read the body (size limit), parse JSON (depth limit), authenticate
(``auth.py``), find the API (9709), map ``data`` to tensors (9801), call Triton through the one
shared asyncio gRPC client with the API's deadline, map the outputs back. Every failure is an
envelope with a code; an unexpected exception is logged with the request id and answered 9998, so
no traceback reaches a client and no worker dies. Only ``GET /`` (liveness) and ``POST /api/...``
exist: none of Triton's own endpoints (model control, shared memory, logging, trace) is reachable.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from toolkit.gateway.auth import Authenticator
from toolkit.gateway.envelope import SUCCESS, RequestError, envelope, new_request_id, render
from toolkit.gateway.mapping import ApiRoute
from toolkit.gateway.settings import ErrorCodes, GatewaySettings
from toolkit.hooks import API_ENTRY_FAILED, INFERENCE_FAILED, QUEUE_TIMEOUT, classify_triton_error

log = logging.getLogger("toolkit.gateway")


class Backend(Protocol):
    """Where inference happens: Triton in production, anything with this shape in a unit test."""

    async def start(self) -> None: ...

    async def infer(self, route: ApiRoute, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    async def close(self) -> None: ...


class TritonBackend:
    """One tritonclient asyncio gRPC client (one channel, reused by every request)."""

    def __init__(self, url: str):
        self.url = url
        self._client: Any = None

    async def start(self) -> None:
        import tritonclient.grpc.aio as grpcaio  # the channel belongs to the running event loop

        self._client = grpcaio.InferenceServerClient(self.url)

    async def infer(self, route: ApiRoute, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, array in tensors.items():
            item = grpcaio.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array)
            inputs.append(item)
        outputs = [grpcaio.InferRequestedOutput(o.tensor) for o in route.outputs]
        result = await self._client.infer(route.model, inputs, outputs=outputs, client_timeout=route.timeout)
        return {o.tensor: result.as_numpy(o.tensor) for o in route.outputs}

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


def triton_error(error: Exception, codes: ErrorCodes, timeout: float) -> RequestError:
    """A failed Triton call as an envelope error: the hook's own code when it sent one."""
    message = error.message() if hasattr(error, "message") and callable(error.message) else str(error)
    message = message or type(error).__name__
    status = str(error.status()) if hasattr(error, "status") and callable(error.status) else ""
    code, text = classify_triton_error(message)
    deadline = "DEADLINE_EXCEEDED" in status or "deadline exceeded" in message.lower()
    if deadline and code in (None, QUEUE_TIMEOUT):  # a hook's own code still wins
        return RequestError(codes.queue_timeout, f"inference did not finish within {timeout:g}s")
    if code is None:
        return RequestError(codes.inference_failed, f"inference failed: {message}")
    mapped = {API_ENTRY_FAILED: codes.api_entry_failed, INFERENCE_FAILED: codes.inference_failed,
              QUEUE_TIMEOUT: codes.queue_timeout}.get(code, code)
    return RequestError(mapped, text)


async def read_body(request: Request, limit: int, codes: ErrorCodes) -> bytes:
    too_large = RequestError(codes.missing_parameter, f"request body is larger than {limit} bytes", status=413)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


def _int_as_go_would(text: str) -> int | float:
    value = int(text)
    float(value)  # OverflowError beyond float64, as Go's decoder refuses it
    return -0.0 if text == "-0" else value


def parse_body(body: bytes, max_depth: int, codes: ErrorCodes) -> dict[str, Any]:
    """The request's JSON object, refusing what Go's decoder refuses (NaN, overflow) and nesting
    deeper than ``max_depth``."""
    try:
        fields = json.loads(body.decode("utf-8"), parse_constant=_reject_constant,
                            parse_float=_finite_float, parse_int=_int_as_go_would)
    except RecursionError:  # the C decoder stops at Python's recursion limit, not by crashing
        raise RequestError(codes.missing_parameter, f"request JSON is nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise RequestError(codes.missing_parameter, "request body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise RequestError(codes.missing_parameter, "request body must be a JSON object")
    if _depth(fields) > max_depth:
        raise RequestError(codes.missing_parameter, f"request JSON is nested deeper than {max_depth} levels")
    return fields


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
                         if isinstance(child, dict | list))
    return deepest


@dataclass
class _Call:
    request_id: str
    app_id: str = ""  # echoed in the envelope once the signature is verified, as go-infer does


class Gateway:
    """The request pipeline, independent of the ASGI framework."""

    def __init__(self, settings: GatewaySettings, routes: Mapping[str, ApiRoute], backend: Backend):
        self.settings, self.routes, self.backend = settings, dict(routes), backend
        self.codes = settings.err_code
        self.auth = Authenticator(settings)

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        call, path, status = _Call(new_request_id()), request.path_params.get("path", ""), 200
        try:
            data = await self._serve(request, path, call)
            body = envelope(call.app_id, call.request_id, SUCCESS, data)
        except RequestError as e:
            status = e.status
            body = envelope(call.app_id, call.request_id, e.code, msg=e.message)
        except Exception:
            log.exception("%s POST /api/%s failed unexpectedly", call.request_id, path)
            body = envelope(call.app_id, call.request_id, self.codes.inference_failed,
                            msg=f"internal error (request {call.request_id})")
        try:
            content = render(body)
        except ValueError:  # an output JSON cannot carry; never a 500 without an envelope
            log.exception("%s POST /api/%s: answer not serialisable", call.request_id, path)
            body = envelope(call.app_id, call.request_id, self.codes.inference_failed,
                            msg=f"internal error (request {call.request_id})")
            content = render(body)
        log.info("%s POST /api/%s appId=%s code=%s %.1fms", call.request_id, path, call.app_id or "-",
                 body["code"], (time.perf_counter() - started) * 1000)
        return Response(content, status_code=status, media_type="application/json")

    async def _serve(self, request: Request, path: str, call: _Call) -> dict[str, Any]:
        api = self.settings.api
        fields = parse_body(await read_body(request, api.max_body_bytes, self.codes), api.max_json_depth, self.codes)
        caller = await self.auth.authenticate(fields)
        call.app_id = caller.app_id
        route = self.routes.get(path)
        if route is None:
            raise RequestError(self.codes.unknown_api_path, "unknown path")
        tensors, single = route.to_tensors(caller.data, self.codes.missing_parameter)
        try:
            outputs = await self.backend.infer(route, tensors)
        except Exception as e:
            if not _is_triton_error(e):
                raise
            raise triton_error(e, self.codes, route.timeout) from e
        return route.to_data(outputs, single, self.codes.inference_failed)


def _is_triton_error(error: Exception) -> bool:
    from tritonclient.utils import InferenceServerException

    return isinstance(error, InferenceServerException)


def create_app(settings: GatewaySettings, routes: Mapping[str, ApiRoute], *,
               backend: Backend | None = None) -> Starlette:
    """The ASGI app. ``backend`` defaults to Triton at ``settings.triton.url`` (connected at start-up)."""
    gateway = Gateway(settings, routes, backend or TritonBackend(settings.triton.url))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await gateway.backend.start()
        try:
            yield
        finally:
            await gateway.backend.close()

    async def liveness(_request: Request) -> Response:
        return PlainTextResponse("Hello world.")  # go-infer's answer on GET /

    app = Starlette(routes=[Route("/", liveness, methods=["GET"]),
                            Route("/api/{path:path}", gateway.handle, methods=["POST"])],
                    lifespan=lifespan)
    app.state.gateway = gateway
    return app
