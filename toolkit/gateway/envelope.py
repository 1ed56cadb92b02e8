"""go-infer's response envelope, request ids, and the one exception a request can fail with.

    {"appId": "...", "code": 0, "data": {..., "msg": "success", "requestId": "..."},
     "encType": "plain", "signType": "plain", "success": true, "timestamp": 1658716495}

On error ``success`` is false and ``data`` is ``{"msg", "requestId"}``. Keys are sorted and the
body ends with a newline, as Go's ``json.Encoder`` writes a map. HTTP status is 200 whenever an
envelope can be formed, as in go-infer; only a body over the size limit also says 413.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

SUCCESS = 0


class RequestError(Exception):
    """One request failed: the client gets ``code`` and ``message`` in an envelope."""

    def __init__(self, code: int, message: str, *, status: int = 200, close: bool = False):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status
        self.close = close  # answer, then close the connection rather than read the rest of the body


def new_request_id() -> str:
    """go-infer's shape: the date, then 32 random hex digits (``20260122`` + 128 bits)."""
    return time.strftime("%Y%m%d") + secrets.token_hex(16)


def envelope(app_id: str, request_id: str, code: int, data: dict[str, Any] | None = None,
             msg: str = "success") -> dict[str, Any]:
    body = dict(data or {})
    body["msg"] = msg
    body["requestId"] = request_id
    return {"appId": app_id, "code": code, "signType": "plain", "encType": "plain",
            "success": code == SUCCESS, "timestamp": int(time.time()), "data": body}


def render(value: dict[str, Any]) -> bytes:
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True,
                       allow_nan=False) + "\n").encode("utf-8")
