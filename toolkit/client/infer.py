"""Call a running Triton over HTTP or gRPC with numpy in and numpy out (tritonclient underneath).

    with TritonClient("127.0.0.1:8001", protocol="grpc") as client:
        out = client.infer("embedding", {"TEXT": np.array([[b"hello"]], dtype=object)})

Errors come back as ``InferenceError`` with Triton's message, and the hook's numeric code when it
sent one (``[1001] TEXT must not be empty``), 9997 for a timeout, 9996 for "busy or restarting"
(``toolkit.client.failures``). A 9996 failure is retried (``toolkit.client.retry``) while the
deadline allows, and the deadline travels to Triton as the request's timeout.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

from toolkit.client.balancing import channel_args, grpc_target, is_balanced
from toolkit.client.failures import classify_triton_error
from toolkit.client.retry import RETRIES, retry_pause
from toolkit.client.values import to_bytes
from toolkit.errors import InferenceError, ToolkitError

Protocol = Literal["http", "grpc"]


class TritonClient:
    def __init__(self, url: str, *, protocol: Protocol = "http", timeout: float = 60.0, retries: int = RETRIES,
                 compression: str | None = None):
        from tritonclient.utils import InferenceServerException

        if "," not in url and not url.startswith("dns:///"):  # one replica: accept what serve prints
            url = normalize_url(url)
        self.url, self.protocol, self.timeout, self.retries = url, protocol, timeout, retries
        self._client = None
        if compression not in (None, "gzip", "deflate") or (compression == "deflate" and protocol == "grpc"):
            raise InferenceError(f"compression {compression!r}: use gzip (HTTP or gRPC) or deflate (HTTP)")
        #: Request and response bodies compressed on the wire (Paddle Serving 5.1): HTTP gzip/deflate
        #: both ways, gRPC gzip.
        self.compression = compression
        self._server_error = InferenceServerException
        try:
            if protocol == "http" and is_balanced(url):
                raise InferenceError(f"{url}: several replicas need --protocol grpc (gRPC balances them itself)")
            if protocol == "http":
                import tritonclient.http as module

                self._client = module.InferenceServerClient(
                    url, connection_timeout=timeout, network_timeout=timeout)
            elif protocol == "grpc":
                import tritonclient.grpc as module

                # One replica, or several balanced by gRPC itself (toolkit/client/balancing.py).
                self._client = module.InferenceServerClient(grpc_target(url), channel_args=channel_args(url))
            else:
                raise InferenceError(f"unknown protocol {protocol!r}: use http or grpc")
        except (InferenceServerException, ValueError) as e:
            message = e.message() if isinstance(e, InferenceServerException) else str(e)
            raise InferenceError(f"cannot connect to {url}: {message}") from e
        except ToolkitError as e:
            raise InferenceError(str(e)) from e
        self._module = module

    def _wrap(self, error: Exception, what: str) -> InferenceError:
        message = error.message() if isinstance(error, self._server_error) else str(error)
        status = error.status() if isinstance(error, self._server_error) else None
        code, _ = classify_triton_error(message or "", status)
        if _is_unreachable(error, message):
            message = (f"cannot reach Triton at {self.url} ({self.protocol}): {message or type(error).__name__}; "
                       "is `toolkit serve` running, and is this its " + self.protocol.upper() + " port?")
        elif self.protocol == "http" and _not_triton_http(error):
            return InferenceError(_wrong_http_port(self.url, error))
        return InferenceError(f"{what}: {message}", code=code, status=status)

    def infer(self, model: str, inputs: Mapping[str, np.ndarray], *, outputs: list[str] | None = None,
              version: str = "", timeout: float | None = None) -> dict[str, np.ndarray]:
        """One inference; returns every output (or the named ones) as numpy arrays."""
        from tritonclient.utils import np_to_triton_dtype

        infer_inputs = []
        for name, array in inputs.items():
            array = np.asarray(array)
            if array.dtype.kind in "UO":
                array = to_bytes(array)
            item = self._module.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if self.protocol == "http":
                item.set_data_from_numpy(array, binary_data=True)
            else:
                item.set_data_from_numpy(array)
            infer_inputs.append(item)
        requested = None
        if outputs:
            kwargs = {"binary_data": True} if self.protocol == "http" else {}
            requested = [self._module.InferRequestedOutput(n, **kwargs) for n in outputs]
        deadline = time.monotonic() + (timeout or self.timeout)
        for attempt in range(self.retries + 1):
            # The caller's deadline travels with the request (Triton's request timeout, in
            # microseconds): a request still queued when its caller has given up is dropped, not run.
            left = max(deadline - time.monotonic(), 0.001)
            try:
                if self.protocol == "grpc":
                    result = self._client.infer(model, infer_inputs, model_version=version, outputs=requested,
                                                client_timeout=left, timeout=int(left * 1e6),
                                                compression_algorithm=self.compression)
                    names = [o.name for o in result.get_response().outputs]
                else:
                    result = self._client.infer(model, infer_inputs, model_version=version, outputs=requested,
                                                timeout=int(left * 1e6),
                                                request_compression_algorithm=self.compression,
                                                response_compression_algorithm=self.compression)
                    names = [o["name"] for o in result.get_response()["outputs"]]
                return {name: result.as_numpy(name) for name in names}
            except Exception as e:
                error = self._wrap(e, f"model '{model}'")
                pause = retry_pause(error.code, attempt, deadline - time.monotonic(), retries=self.retries)
                if pause is None:
                    raise error from e
                time.sleep(pause)
        raise AssertionError("unreachable")

    def metadata(self, model: str) -> dict[str, Any]:
        try:
            if self.protocol == "grpc":
                return self._client.get_model_metadata(model, as_json=True)
            return self._client.get_model_metadata(model)
        except Exception as e:
            raise self._wrap(e, f"model '{model}'") from e

    def config(self, model: str) -> dict[str, Any]:
        try:
            if self.protocol == "grpc":
                return self._client.get_model_config(model, as_json=True)["config"]
            return self._client.get_model_config(model)
        except Exception as e:
            raise self._wrap(e, f"model '{model}'") from e

    def statistics(self, model: str) -> dict[str, Any]:
        """Triton's per-model statistics (inference and execution counts, queue and compute time)."""
        try:
            if self.protocol == "grpc":
                stats = self._client.get_inference_statistics(model, as_json=True)
            else:
                stats = self._client.get_inference_statistics(model)
        except Exception as e:
            raise self._wrap(e, f"model '{model}'") from e
        return stats["model_stats"][0]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def normalize_url(url: str) -> str:
    """``http://127.0.0.1:8000/v2`` (what `toolkit serve` prints) -> ``127.0.0.1:8000``: tritonclient
    wants host:port only."""
    original = url
    url = url.strip()
    for scheme in ("http://", "https://", "grpc://"):
        if url.lower().startswith(scheme):
            url = url[len(scheme):]
    url = url.split("/", 1)[0]
    host, sep, port = url.rpartition(":")
    if not sep:  # a host alone: tritonclient's default port
        host, port = url, "80"
    if not host or " " in host or not (port.isdigit() and 0 < int(port) < 65536):
        raise InferenceError(f"bad URL {original!r}: expected host:port, e.g. 127.0.0.1:8000 (HTTP) or "
                             "127.0.0.1:8001 (gRPC)")
    return url


def _not_triton_http(error: Exception) -> bool:
    """The port answered, but not as Triton's HTTP API does: not HTTP at all (gRPC's HTTP/2 frames,
    which the HTTP client cannot parse), or HTTP without Triton's JSON (the metrics port's empty 404)."""
    from http.client import HTTPException

    return isinstance(error, HTTPException) or (isinstance(error, ValueError) and "Parse error" in str(error))


def _wrong_http_port(url: str, error: Exception) -> str:
    from http.client import HTTPException

    if isinstance(error, HTTPException):
        return (f"{url} does not speak HTTP (its answer is not HTTP/1.1): is it Triton's gRPC port? "
                "try --protocol grpc, or Triton's HTTP port (8000 unless `toolkit serve --http-port` said otherwise)")
    return (f"{url} speaks HTTP but is not Triton's HTTP API (an empty, non-JSON answer): is it Triton's metrics "
            "port? use Triton's HTTP port (8000 unless `toolkit serve --http-port` said otherwise)")


def _is_unreachable(error: Exception, message: str) -> bool:
    text = f"{type(error).__name__} {message}".lower()
    return isinstance(error, ConnectionError | OSError) or any(
        hint in text for hint in ("connection refused", "failed to connect", "connect call failed",
                                  "name or service not known"))
