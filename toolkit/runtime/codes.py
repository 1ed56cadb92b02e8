"""The error codes the python stub sends, and their one wire format: ``[code] message``.

Part of the stub side's contract (see ``toolkit.runtime``): the adapter writes these, the client
(``toolkit.client.failures``) and the REST gateway read them back. numpy-free, Python 3.10.
"""

from __future__ import annotations

import re

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
