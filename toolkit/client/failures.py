"""Triton's error text -> the toolkit's code: what a failed request means to the caller.

The client side's reader of the stub's ``[code] message`` (``toolkit.runtime.codes``) and of
Triton's own words for a transient failure; the library client, its retry and the REST gateway
share it.
"""

from __future__ import annotations

from toolkit.runtime.codes import QUEUE_TIMEOUT, UNAVAILABLE, parse_coded_message

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
