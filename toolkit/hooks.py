"""The hook API users import: ``from toolkit.hooks import Hook, HookContext, HookError``.

A re-export of ``toolkit.runtime.hooks`` (the contract the python stub runs) and
``toolkit.runtime.codes`` (the error codes and their ``[code] message`` wire format), kept at this
path so user hooks and specs keep working. Stub side: imports only ``toolkit.runtime``.
"""

from __future__ import annotations

from toolkit.runtime.codes import (
    API_ENTRY_FAILED,
    INFERENCE_FAILED,
    QUEUE_TIMEOUT,
    UNAVAILABLE,
    format_coded_message,
    parse_coded_message,
)
from toolkit.runtime.hooks import Hook, HookContext, HookError

__all__ = ["API_ENTRY_FAILED", "INFERENCE_FAILED", "QUEUE_TIMEOUT", "UNAVAILABLE", "Hook", "HookContext",
           "HookError", "format_coded_message", "parse_coded_message"]
