"""The hook API: go-infer's ``Model`` interface (ApiPath / ApiEntry / Init / Infer) in Python.

A user writes one class; the toolkit's fixed Triton adapter (``toolkit/runtime/model.py``) drives it:

    class Tokenizer(Hook):
        api_path = "embedding"                      # name clients and the REST gateway use

        def init(self, ctx):                        # once per model instance: load weights
            self.vocab = (ctx.model_dir / "vocab.txt").read_text()

        def api_entry(self, request):               # once per request: validate, normalise
            if request["TEXT"].size == 0:
                raise HookError(1001, "TEXT must not be empty")
            return request

        def infer(self, batch):                     # once per dynamic batch, on stacked inputs
            return {"IDS": ...}

        def finalize(self):                         # optional: release resources
            ...

Tensors are numpy arrays keyed by tensor name. For a model with ``max_batch_size > 0`` every
array has the batch as its first axis: ``api_entry`` sees one request's arrays, ``infer`` sees the
requests of one dynamic batch concatenated along axis 0 and must return arrays whose first axis has
the same total length, which the adapter splits back per request. BYTES tensors are numpy object
arrays of ``bytes``.

This module is imported inside Triton's python stub, so it must stay light (numpy only) and
Python 3.10 compatible (the 24.10 container's stub is 3.10).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.runtime.occupancy import Occupancy

#: The code sent when ``api_entry`` fails with an exception that carries no code of its own.
API_ENTRY_FAILED = 9701
#: The code sent when ``infer`` fails with an exception that carries no code of its own.
INFERENCE_FAILED = 9998
#: The code sent when a request waited in Triton's queue longer than its timeout.
QUEUE_TIMEOUT = 9997
#: The code for "busy or restarting, try again": a full queue, a model instance whose stub died and
#: is being replaced, a model (re)loading. Transport status UNAVAILABLE / HTTP 503; safe to retry,
#: since inference is idempotent.
UNAVAILABLE = 9996

_CODED_MESSAGE = re.compile(r"^\[(\d+)\] (.*)$", re.DOTALL)


class HookError(Exception):
    """A request-level failure the client is meant to see: a numeric code and a message.

    Raise it from ``api_entry`` (or ``infer``) to reject a request; only that request fails. The
    client receives ``"[<code>] <message>"``; no traceback leaves the server.
    """

    def __init__(self, code: int, message: str):
        if not isinstance(code, int) or isinstance(code, bool) or code < 0:
            raise TypeError(f"HookError code must be a non-negative int, got {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def wire_message(self) -> str:
        return format_coded_message(self.code, self.message)


def format_coded_message(code: int, message: str) -> str:
    """The one wire format for coded errors: ``[code] message``."""
    return f"[{code}] {message}"


def parse_coded_message(text: str) -> tuple[int | None, str]:
    """Inverse of ``format_coded_message``; tolerates Triton's prefixes before the bracket."""
    start = text.find("[")
    while start != -1:
        match = _CODED_MESSAGE.match(text[start:])
        if match:
            return int(match.group(1)), match.group(2)
        start = text.find("[", start + 1)
    return None, text


#: Triton's words for a transient failure: the queue is full, a python stub died (the toolkit's
#: watchdog replaces it within seconds), or the model is (re)loading or not loaded right now.
_TRANSIENT = ("exceeds maximum queue size", "is not healthy", "failed to obtain the health mutex",
              "has no available versions", "is not ready", "unavailable")


def classify_triton_error(message: str, status: str | None = None) -> tuple[int | None, str]:
    """The code and text of a failed request as Triton reports it: the hook's ``[code] message``;
    QUEUE_TIMEOUT when Triton's queue policy or the request's own timeout gave up on it (go-infer's
    MessageTimeout); UNAVAILABLE when it failed for a transient reason and may be retried (see
    ``is_retryable``); otherwise ``None`` and Triton's text.

    ``status`` is the transport's status when known (gRPC ``StatusCode.UNAVAILABLE`` spelled any
    way, or an HTTP status such as ``"503"``)."""
    code, text = parse_coded_message(message)
    if code is not None:
        return code, text
    lowered = message.lower()
    if "timeout expired" in lowered:
        return QUEUE_TIMEOUT, "request timed out in Triton's queue"
    if "deadline exceeded" in lowered or "timed out" in lowered or "DEADLINE_EXCEEDED" in str(status or ""):
        return QUEUE_TIMEOUT, "the request's deadline passed before it was answered"
    if "exceeds maximum queue size" in lowered:
        return UNAVAILABLE, "server busy: the model's queue is full, retry later"
    if any(word in lowered for word in _TRANSIENT) or _unavailable_status(status):
        return UNAVAILABLE, "model temporarily unavailable (restarting or loading), retry"
    return None, text


def _unavailable_status(status: str | None) -> bool:
    if not status:
        return False
    text = str(status).upper()
    return "UNAVAILABLE" in text or "RESOURCE_EXHAUSTED" in text or text.strip() in ("503", "429")


def is_retryable(code: int | None) -> bool:
    """Whether a request that failed with ``code`` (from ``classify_triton_error``) may simply be sent
    again: only UNAVAILABLE. A queue timeout already spent the caller's time; a hook's own code is
    the answer."""
    return code == UNAVAILABLE


@dataclass(frozen=True)
class HookContext:
    """What ``init`` gets to know about the model instance it runs in."""

    model_name: str
    model_version: int
    #: The version folder: exported artifacts (model.onnx, vocab.txt) and the hook's files live here.
    model_dir: Path
    #: The model's config ``parameters`` (strings), with the toolkit's own ``toolkit.*`` keys removed.
    parameters: dict[str, str] = field(default_factory=dict)
    instance_name: str = ""
    #: How many instances of this model Triton runs (its ``instance_group`` count): size thread
    #: pools as ``cores // instance_count`` so instances do not fight over cores.
    instance_count: int = 1
    max_batch_size: int = 0
    #: Whether another instance of this model is executing a batch right now
    #: (``occupancy.others_busy()``): a hook may then size a run's thread pool to its share.
    occupancy: Occupancy = field(default_factory=Occupancy)


class Hook:
    """Base class for user hooks. Only ``infer`` is required."""

    #: The name under which clients and the REST gateway reach this model (go-infer's ApiPath).
    api_path: str | None = None

    def init(self, ctx: HookContext) -> None:
        """Load weights and other state. Called once per model instance."""

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and normalise one request. Raise ``HookError`` to reject it."""
        return request

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Compute the outputs of one dynamic batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement infer(batch)")

    def finalize(self) -> None:
        """Release resources when Triton unloads the model."""
