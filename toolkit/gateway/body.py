"""One request's body: read it (size limit, read timeout, gzip inflated under the same limit), parse
its JSON as Go's decoder would, and print request values safely in a log line.

Shared by the ASGI app and the authenticator's check workers, which parse the body off the event
loop; it imports neither.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from typing import Any

from starlette.requests import ClientDisconnect, Request

from toolkit.gateway.envelope import RequestError
from toolkit.gateway.settings import ErrorCodes


class ClientGone(Exception):
    """The client disconnected before its body arrived: nobody is left to answer."""


async def read_body(request: Request, limit: int, codes: ErrorCodes, read_timeout: float) -> bytes:
    """The body, whole, within ``read_timeout`` seconds and ``limit`` bytes (after gzip decoding)."""
    too_large = RequestError(codes.missing_parameter, f"request body is larger than {limit} bytes", status=413)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip"):
        raise RequestError(codes.missing_parameter, "unsupported Content-Encoding (use gzip or none)", status=415)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else None
    chunks, size = [], 0
    try:
        async with asyncio.timeout(read_timeout):
            async for chunk in request.stream():
                if inflate is not None:
                    try:  # never inflate more than the limit allows: a gzip bomb stops here
                        chunk = inflate.decompress(chunk, limit + 1 - size)
                    except zlib.error:
                        raise RequestError(codes.missing_parameter, "request body is not valid gzip") from None
                    if inflate.unconsumed_tail:
                        raise too_large
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestError(codes.missing_parameter, f"request body not received within {read_timeout:g}s",
                           status=408) from None
    except ClientDisconnect:
        raise ClientGone from None
    if inflate is not None and not inflate.eof:
        raise RequestError(codes.missing_parameter, "request body is not valid gzip (truncated)")
    return b"".join(chunks)


def printable(value: Any, limit: int = 200) -> str:
    """A request-supplied value as it may appear in a log line: control characters and non-ASCII
    escaped, never a forged line break, length-capped."""
    text = value if isinstance(value, str) else str(value)
    escaped = text.encode("unicode_escape", "backslashreplace").decode("ascii", "backslashreplace")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("number out of range")
    return value


#: A JSON integer Go decodes differently from Python's int: ``-0`` (a float64 -0). A match inside a
#: string only costs the faster decoding.
_NEGATIVE_ZERO = re.compile(rb"-0(?![0-9.eE])")


def _int_as_go_would(text: str) -> int | float:
    value = int(text)
    float(value)  # OverflowError beyond float64, as Go's decoder refuses it
    return -0.0 if text == "-0" else value


def parse_body(body: bytes, max_depth: int, codes: ErrorCodes) -> dict[str, Any]:
    """The request's JSON object, refusing what Go's decoder refuses (NaN, overflow) and nesting
    deeper than ``max_depth``."""
    # Integers are decoded in C (a callback for each made a 16 MB body of small integers ~4x slower),
    # but for a body that may hold -0, Go's float64 -0; _walk refuses what overflows a float64.
    slow_ints = _int_as_go_would if _NEGATIVE_ZERO.search(body) else None
    try:
        fields = json.loads(body.decode("utf-8"), parse_constant=_reject_constant,
                            parse_float=_finite_float, parse_int=slow_ints)
    except RecursionError:  # the C decoder stops at Python's recursion limit, not by crashing
        raise RequestError(codes.missing_parameter, f"request JSON is nested deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError, OverflowError):
        raise RequestError(codes.missing_parameter, "request body is not valid JSON") from None
    if not isinstance(fields, dict):
        raise RequestError(codes.missing_parameter, "request body must be a JSON object")
    try:
        depth = _walk(fields)
    except OverflowError:  # an integer beyond float64, as Go's decoder refuses it
        raise RequestError(codes.missing_parameter, "request body is not valid JSON") from None
    if depth > max_depth:
        raise RequestError(codes.missing_parameter, f"request JSON is nested deeper than {max_depth} levels")
    return fields


def _walk(value: Any) -> int:
    """How deeply ``value`` nests; raises OverflowError for an integer a float64 cannot hold. Each
    container's values are looked at by type in C (``map``), so a body of millions of numbers is
    walked in a fraction of a second."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = list(item.values()) if isinstance(item, dict) else item
        kinds = set(map(type, children))
        if int in kinds:
            ints = children if len(kinds) == 1 else [c for c in children if type(c) is int]
            float(max(ints)), float(min(ints))  # the extremes overflow first
        if dict in kinds or list in kinds:
            stack.extend((c, depth + 1) for c in children if type(c) in (dict, list))
    return deepest
