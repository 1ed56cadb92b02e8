"""When to send a failed inference again: one policy for the library client and the gateway.

Only a failure classified UNAVAILABLE (9996: a full queue, a python stub that died and is being
replaced, a model reloading, a server restarting) is retried, since inference is idempotent; a
hook's own code, a crash (9998) and a timeout (9997, the caller's time is spent) are answers. The
pauses grow (0.25 s, 0.5 s, then 1 s each, with jitter): the first three cover the watchdog's usual
recovery of one to three seconds, the rest a whole tritonserver restarting; no retry is sent that
the caller's deadline could not wait for.
"""

from __future__ import annotations

import random

from toolkit.client.failures import is_retryable

#: Retries after the first attempt (bounded by the deadline long before: ~10 s of pauses).
RETRIES = 12
#: The first pause; each next one doubles.
FIRST_PAUSE = 0.25


def retry_pause(code: int | None, attempt: int, time_left: float, *, retries: int = RETRIES) -> float | None:
    """Seconds to wait before attempt ``attempt + 1`` after a failure with ``code`` (``attempt``
    counts from 0), or None when the failure is final: not retryable, out of retries, or out of time."""
    if not is_retryable(code) or attempt >= retries:
        return None
    pause = min(FIRST_PAUSE * (2 ** attempt), 1.0) * (1 + 0.2 * random.random())
    return pause if time_left > pause + 0.05 else None
