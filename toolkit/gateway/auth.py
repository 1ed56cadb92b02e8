"""Checking a signed go-infer request, in go-infer's order, with its codes.

fields (9801) -> timestamp window (9802) -> appId (9805) -> version (9806) -> signType (9803)
-> signature (9800) -> not seen before (replay; 9800 by default).

Safer than go-infer, still compatible: signatures are compared in constant time, a signature may
be used once within the timestamp window, SM2 signatures must be exactly 64 bytes with r, s in
range, and nothing secret (app secrets, the expected signature) is ever put in a message or a log.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from toolkit.gateway.envelope import RequestError
from toolkit.gateway.settings import GatewaySettings
from toolkit.gateway.signing import (
    Sm2Verifier,
    canonical_string,
    decode_signature,
    sha256_matches,
)

#: ``signData`` of SHA256: base64 of a 64-character hex digest.
_SHA256_SIGN_LENGTH = 88


@dataclass(frozen=True)
class Authenticated:
    app_id: str
    data: dict[str, Any]


class ReplayCache:
    """Signatures seen within the window, keyed by (appId, signData); bounded in memory.

    An entry lives until its request's timestamp leaves the window (after that the timestamp check
    rejects the request anyway). When full, the oldest entries go first: size it for the peak
    request rate times twice the window.
    """

    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, key: tuple[str, str], expires: float, now: float) -> bool:
        """True if ``key`` was recorded and is still live; otherwise record it."""
        while self._expiry and next(iter(self._expiry.values())) < now:
            self._expiry.popitem(last=False)
        previous = self._expiry.get(key)
        if previous is not None and previous >= now:
            return True
        self._expiry[key] = expires
        while len(self._expiry) > self.max_entries:
            self._expiry.popitem(last=False)
        return False


def _text_field(fields: Mapping[str, Any], name: str, missing: int, *, required: bool = True) -> str | None:
    value = fields.get(name)
    if value is None and not required and name not in fields:
        return None
    if not isinstance(value, str):
        raise RequestError(missing, f"missing or invalid parameter: {name} (a string)")
    return value


class Authenticator:
    def __init__(self, settings: GatewaySettings, *, clock: Callable[[], float] = time.time):
        self.api, self.codes, self.clock = settings.api, settings.err_code, clock
        private = self.api.sm2_private_key.get_secret_value() if self.api.sm2_private_key else None
        self._sm2 = (Sm2Verifier.from_settings(private, self.api.sm2_public_key)
                     if private or self.api.sm2_public_key else None)
        self._replays = ReplayCache(self.api.replay_cache_size)

    async def authenticate(self, fields: Mapping[str, Any]) -> Authenticated:
        codes = self.codes
        app_id = _text_field(fields, "appId", codes.missing_parameter)
        version = _text_field(fields, "version", codes.missing_parameter, required=False)
        sign_type = _text_field(fields, "signType", codes.missing_parameter)
        sign_data = _text_field(fields, "signData", codes.missing_parameter, required=sign_type != "plain")
        timestamp = fields.get("timestamp")
        if not isinstance(timestamp, int | float) or isinstance(timestamp, bool):
            raise RequestError(codes.missing_parameter, "missing or invalid parameter: timestamp (unix seconds)")
        data = fields.get("data")
        if not isinstance(data, dict):
            raise RequestError(codes.missing_parameter, "missing or invalid parameter: data (an object)")
        if fields.get("encType", "plain") != "plain":
            raise RequestError(codes.missing_parameter, "invalid parameter: encType (only plain is supported)")

        now = self.clock()
        if abs(now - int(timestamp)) > self.api.req_time_diff:
            raise RequestError(codes.timestamp_out_of_window,
                               f"timestamp is more than {self.api.req_time_diff}s away from the server's time")
        secret = self.api.app_id_secret.get(app_id)
        if secret is None:
            raise RequestError(codes.unknown_app_id, "unknown appId")
        if version is not None and version != "1":
            raise RequestError(codes.wrong_version, "unsupported version (use \"1\")")

        if sign_type == "plain":
            if app_id not in self.api.plain_app_ids:
                raise RequestError(codes.unknown_sign_type, "signType plain is not allowed for this appId")
            return Authenticated(app_id, data)
        strings = self._signing_strings(fields, secret.get_secret_value())
        if sign_type == "SHA256":
            if len(sign_data) != _SHA256_SIGN_LENGTH or decode_signature(sign_data) is None:
                raise RequestError(codes.bad_signature,
                                   "invalid signature: signData must be base64 of a SHA256 hex digest")
            valid = any([sha256_matches(s, sign_data) for s in strings])  # every comparison runs
        elif sign_type == "SM2" and self._sm2 is not None:
            raw = decode_signature(sign_data)
            if raw is None or len(raw) != 64:
                raise RequestError(codes.bad_signature,
                                   "invalid signature: signData must be base64 of a 64-byte SM2 signature (r||s)")
            valid = await asyncio.to_thread(self._verify_sm2, strings, raw)
        else:
            raise RequestError(codes.unknown_sign_type, "unknown signType (use SHA256 or SM2)")
        if not valid:
            raise RequestError(codes.bad_signature, "invalid signature")
        if self.api.reject_replay and self._replays.seen(
                (app_id, sign_data), expires=int(timestamp) + self.api.req_time_diff, now=now):
            raise RequestError(codes.replayed_signature, "invalid signature: already used (replayed request)")
        return Authenticated(app_id, data)

    def _signing_strings(self, fields: Mapping[str, Any], secret: str) -> list[str]:
        strings = [canonical_string(fields, secret, style="go")]
        if self.api.accept_python_json:
            python = canonical_string(fields, secret, style="python")
            if python != strings[0]:
                strings.append(python)
        return strings

    def _verify_sm2(self, strings: list[str], raw: bytes) -> bool:
        assert self._sm2 is not None
        return any(self._sm2.verify(s, raw) for s in strings)
