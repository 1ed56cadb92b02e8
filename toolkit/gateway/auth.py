"""Checking a signed go-infer request, in go-infer's order, with its codes, off the event loop.

fields (9801) -> timestamp window (9802) -> appId (9805) -> version (9806) -> signType (9803)
-> signature (9800) -> not seen before (replay; 9800 by default) -> the app's rate limit (9810),
and only a request that passes the rate limit spends its signature: a 429 sent again unchanged is
served once the bucket refills.

No single request can stall the gateway: parsing the body, building the string to sign (which
walks all of ``data``) and verifying the signature run in worker processes, never on the event
loop, and never more than ``MaxPendingChecks`` at once (more are answered 9996, "busy", at once).
The workers form two lanes (``fairness.FairLane``): small SM2 bodies in ``CheckWorkers``
processes, bodies of ``LargeBodyBytes`` or more in ``LargeCheckWorkers`` others, each served
round-robin between client addresses, so a client posting forged 16 MB bodies (~15 s of a worker
each) delays neither small checks nor another address's large ones. Small SHA256 requests, the
common case, are checked in a thread of the gateway itself (a pool process would add its own
latency for nothing). SM3 is OpenSSL's (``signing.py``): gmssl's pure-Python hash took 1.5 s for
a 300 KB body and 87 s for 16 MB.

Safer than go-infer, still compatible: signatures are compared in constant time; a signature may
be used once within the timestamp window, keyed by its decoded bytes (SHA256: the digest; SM2:
r||s), so a replay cannot pass as new by respelling its base64, which must be canonical anyway;
SM2 signatures must be exactly 64 bytes with r, s in range; nothing secret (app secrets, the
expected signature) is ever put in a message or a log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.gateway.body import parse_body
from toolkit.gateway.envelope import RequestError
from toolkit.gateway.fairness import FairLane
from toolkit.gateway.settings import GatewaySettings
from toolkit.gateway.signing import Sm2Verifier, canonical_string, decode_signature, sha256_matches

#: ``signData`` of SHA256: base64 of a 64-character hex digest.
_SHA256_SIGN_LENGTH = 88
#: Bodies up to this size come back parsed from a worker; larger ones are parsed again, once
#: authenticated (sending millions of parsed numbers between processes costs more than parsing).
_RETURN_FIELDS_BELOW = 256 * 1024
#: Checked in a thread of the gateway: small SHA256 requests (microseconds of work).
_IN_PROCESS_BELOW = 64 * 1024


@dataclass(frozen=True)
class Authenticated:
    app_id: str
    data: dict[str, Any]
    fields: Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """What a check found, small enough to come back from a worker process."""

    app_id: str = ""
    replay_key: bytes = b""
    expires: float = 0.0
    fields: dict[str, Any] | None = None
    error: tuple[int, str, int] | None = None   # code, message, HTTP status


class ReplayCache:
    """Signatures seen within the window, keyed by (appId, decoded signature); bounded in memory.

    An entry lives until its request's timestamp leaves the window (after that the timestamp check
    rejects the request anyway). When full, the oldest entries go first: size it for the peak
    request rate times twice the window.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._expiry: OrderedDict[tuple[str, Any], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, key: tuple[str, Any], expires: float, now: float, *, record: bool = True) -> bool:
        """True if ``key`` was recorded and is still live; otherwise record it (unless ``record``
        is False: the caller records it once the request is certain to be served)."""
        while self._expiry and next(iter(self._expiry.values())) < now:
            self._expiry.popitem(last=False)
        previous = self._expiry.get(key)
        if previous is not None and previous >= now:
            return True
        if not record:
            return False
        self._expiry[key] = expires
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)
        return False


class RateLimiter:
    """A token bucket per appId (``API.RateLimit``), applied once a request is authenticated, so
    forged requests cannot spend a real app's budget."""

    def __init__(self, per_second: float, burst: float, overrides: Mapping[str, tuple[float, float]],
                 clock: Callable[[], float] = time.monotonic):
        self.default, self.overrides, self.clock = (per_second, burst), dict(overrides), clock
        self._buckets: dict[str, tuple[float, float]] = {}   # app -> (tokens, last refill)

    def allow(self, app_id: str) -> float:
        """0 when the request may go; otherwise the seconds until a token is available."""
        rate, burst = self.overrides.get(app_id, self.default)
        if rate <= 0:
            return 0.0
        now = self.clock()
        tokens, last = self._buckets.get(app_id, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens >= 1:
            self._buckets[app_id] = (tokens - 1, now)
            return 0.0
        self._buckets[app_id] = (tokens, now)
        return (1 - tokens) / rate


def _text_field(fields: Mapping[str, Any], name: str, missing: int, *, required: bool = True) -> str | None:
    value = fields.get(name)
    if value is None and not required and name not in fields:
        return None
    if not isinstance(value, str):
        raise RequestError(missing, f"missing or invalid parameter: {name} (a string)")
    return value


class Checker:
    """The CPU part of authentication: parse, check in go-infer's order, verify. Pure: no shared
    state, so it runs in a worker process as well as here."""

    def __init__(self, settings: GatewaySettings, *, clock: Callable[[], float] = time.time):
        self.api, self.codes, self.clock = settings.api, settings.err_code, clock
        private = self.api.sm2_private_key.get_secret_value() if self.api.sm2_private_key else None
        self._sm2 = (Sm2Verifier.from_settings(private, self.api.sm2_public_key)
                     if private or self.api.sm2_public_key else None)

    def check(self, body: bytes, *, return_fields: bool = True) -> Verdict:
        app_id = ""
        try:
            fields = parse_body(body, self.api.max_json_depth, self.codes)
            app_id, key, expires = self.verify(fields)
        except RequestError as e:
            return Verdict(app_id=app_id, error=(e.code, e.message, e.status))
        return Verdict(app_id, key, expires, fields if return_fields else None)

    def verify(self, fields: Mapping[str, Any]) -> tuple[str, bytes, float]:
        """(appId, replay key, expiry) of a request whose signature is valid; RequestError otherwise."""
        codes = self.codes
        app_id = _text_field(fields, "appId", codes.missing_parameter)
        version = _text_field(fields, "version", codes.missing_parameter, required=False)
        sign_type = _text_field(fields, "signType", codes.missing_parameter)
        sign_data = _text_field(fields, "signData", codes.missing_parameter, required=sign_type != "plain")
        timestamp = fields.get("timestamp")
        if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            raise RequestError(codes.missing_parameter, "missing or invalid parameter: timestamp (unix seconds)")
        if not isinstance(fields.get("data"), dict):
            raise RequestError(codes.missing_parameter, "missing or invalid parameter: data (an object)")
        if fields.get("encType", "plain") != "plain":
            raise RequestError(codes.missing_parameter, "invalid parameter: encType (only plain is supported)")
        now = self.clock()
        if abs(now - int(timestamp)) > self.api.req_time_diff:
            raise RequestError(codes.timestamp_out_of_window,
                               f"timestamp is more than {self.api.req_time_diff}s away from the server's time")
        secret = self.api.app_id_secret.get(app_id)  # type: ignore[arg-type]
        if secret is None:
            raise RequestError(codes.unknown_app_id, "unknown appId")
        if version is not None and version != "1":
            raise RequestError(codes.wrong_version, "unsupported version (use \"1\")")
        expires = int(timestamp) + self.api.req_time_diff
        if sign_type == "plain":
            if app_id not in self.api.plain_app_ids:
                raise RequestError(codes.unknown_sign_type, "signType plain is not allowed for this appId")
            return app_id, b"", expires  # type: ignore[return-value]
        if sign_type not in ("SHA256", "SM2") or (sign_type == "SM2" and self._sm2 is None):
            raise RequestError(codes.unknown_sign_type, "unknown signType (use SHA256 or SM2)")
        raw = decode_signature(sign_data)  # type: ignore[arg-type]
        if sign_type == "SHA256" and (raw is None or len(sign_data) != _SHA256_SIGN_LENGTH):  # type: ignore[arg-type]
            raise RequestError(codes.bad_signature,
                               "invalid signature: signData must be canonical base64 of a SHA256 hex digest")
        if sign_type == "SM2" and (raw is None or len(raw) != 64):
            raise RequestError(codes.bad_signature,
                               "invalid signature: signData must be canonical base64 of a 64-byte SM2 signature (r||s)")
        strings = self._signing_strings(fields, secret.get_secret_value())
        if sign_type == "SHA256":
            valid = any([sha256_matches(s, sign_data) for s in strings])  # type: ignore[arg-type]
        else:
            assert self._sm2 is not None and raw is not None
            valid = any(self._sm2.verify(s, raw) for s in strings)
        if not valid:
            raise RequestError(codes.bad_signature, "invalid signature")
        return app_id, raw or b"", expires  # type: ignore[return-value]

    def _signing_strings(self, fields: Mapping[str, Any], secret: str) -> list[str]:
        strings = [canonical_string(fields, secret, style="go")]
        if self.api.accept_python_json:
            python = canonical_string(fields, secret, style="python")
            if python != strings[0]:
                strings.append(python)
        return strings


# --- worker processes ------------------------------------------------------------------------------

_WORKER: Checker | None = None


def _init_worker(raw_settings: dict[str, Any]) -> None:
    global _WORKER
    from toolkit.gateway.settings import parse_settings

    _WORKER = Checker(parse_settings(raw_settings, source="gateway settings"))


def _ready() -> bool:
    return _WORKER is not None


def _check_in_worker(body: bytes) -> Verdict:
    assert _WORKER is not None
    return _WORKER.check(body, return_fields=len(body) < _RETURN_FIELDS_BELOW)


class Authenticator:
    """Authenticates one request's raw body: checks in a worker (or a thread, for small SHA256
    bodies), then the replay cache and the rate limit here, where their state lives."""

    def __init__(self, settings: GatewaySettings, *, clock: Callable[[], float] = time.time,
                 workers: int | None = None):
        self.api, self.codes, self.clock = settings.api, settings.err_code, clock
        self.checker = Checker(settings, clock=clock)
        self._replays = ReplayCache(self.api.replay_cache_size)
        limit = self.api.rate_limit
        self.limiter = RateLimiter(limit.per_second, limit.burst,
                                   {app: (o.per_second, o.burst) for app, o in limit.apps.items()})
        self._settings = settings
        self._workers = self.api.check_workers if workers is None else workers
        self._large_workers = self.api.large_check_workers if workers is None else workers
        self._pools: list[concurrent.futures.ProcessPoolExecutor] = []
        self._small: FairLane | None = None
        self._large: FairLane | None = None
        self._pending = 0

    def start(self) -> None:
        if self._pools:
            return
        raw = self._settings.model_dump(by_alias=True, mode="python")
        raw["API"]["AppIdSecret"] = {k: v.get_secret_value() for k, v in self.api.app_id_secret.items()}
        if self.api.sm2_private_key is not None:
            raw["API"]["SM2PrivateKey"] = self.api.sm2_private_key.get_secret_value()
        if raw.get("Triton", {}).get("AdminHeader") is not None:
            raw["Triton"]["AdminHeader"] = None

        def lane(workers: int) -> FairLane:
            pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(raw,))
            self._pools.append(pool)
            return FairLane(pool, workers)

        if self._workers > 0:  # CheckWorkers 0: every check in threads of the gateway
            self._small = lane(self._workers)
            self._large = lane(self._large_workers) if self._large_workers > 0 else self._small

    async def warm_up(self) -> None:
        """Start every check worker now: spawning one and importing the gateway took 5 s on a
        loaded VM, a wait the first request that needs it would otherwise pay."""
        loop = asyncio.get_running_loop()
        for pool, lane in zip(self._pools, (self._small, self._large), strict=False):
            assert lane is not None
            # Submitted together, each finds no idle worker and so starts one of its own.
            await asyncio.gather(*(loop.run_in_executor(pool, _ready) for _ in range(lane.workers)))

    def close(self) -> None:
        # Waiting lets the pools' queues release their named semaphores (/dev/shm/sem.mp-*);
        # without it a clean exit left five per gateway. The exit joins the workers anyway, and
        # cancel_futures leaves only the checks already running (bounded by MaxBodyBytes).
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools, self._small, self._large = [], None, None

    def _lane(self, body: bytes) -> FairLane | None:
        """Where a body is checked: None (a thread here) for small SHA256 ones."""
        if len(body) >= self.api.large_body_bytes:
            return self._large
        if len(body) < _IN_PROCESS_BELOW and b'"SM2"' not in body:
            return None
        return self._small

    async def authenticate(self, body: bytes, client: str = "") -> Authenticated:
        if self._pending >= self.api.max_pending_checks:
            raise RequestError(self.codes.unavailable, "gateway busy: too many requests being checked, retry later",
                               status=503)
        self._pending += 1
        try:
            lane = self._lane(body)
            if lane is None:
                verdict = await asyncio.to_thread(self.checker.check, body)
            else:
                verdict = await lane.run(client, _check_in_worker, body)
        finally:
            self._pending -= 1
        if verdict.error is not None:
            code, message, status = verdict.error
            raise RequestError(code, message, status=status)
        replay_key = (verdict.app_id, verdict.replay_key)
        check_replay = self.api.reject_replay and verdict.replay_key
        if check_replay and self._replays.seen(replay_key, expires=verdict.expires, now=self.clock(), record=False):
            raise RequestError(self.codes.replayed_signature, "invalid signature: already used (replayed request)")
        wait = self.limiter.allow(verdict.app_id)
        if wait > 0:  # refused before its signature is spent: the same request may come again
            raise RequestError(self.codes.rate_limited, f"rate limit of this appId exceeded; retry in {wait:.2f}s",
                               status=429)
        if check_replay and self._replays.seen(replay_key, expires=verdict.expires, now=self.clock()):
            raise RequestError(self.codes.replayed_signature, "invalid signature: already used (replayed request)")
        fields = verdict.fields
        if fields is None:  # a large body: parsed again here, now that it is authenticated
            fields = await asyncio.to_thread(parse_body, body, self.api.max_json_depth, self.codes)
        return Authenticated(verdict.app_id, fields["data"], fields)
