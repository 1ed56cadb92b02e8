"""go-infer's request signature: the string to sign, SHA256, and SM2 with SM3 (via ``gmssl``).

The string to sign is every top-level field but ``signData``, keys in ascending byte order, ``k=v``
joined by ``&``, then ``&key=<appSecret>``. go-infer computes it in Go from the JSON it decoded
(every number a float64), so this module reproduces Go's spellings exactly:

- strings as they are; ``timestamp`` as an integer (go-infer truncates it to int64);
- objects and arrays (``data``, nested extra fields) as Go's ``json.Marshal`` writes them: sorted
  keys, no spaces, non-ASCII left as is, ``<``, ``>``, ``&``, U+2028 and U+2029 escaped as
  ``\\u003c``-style sequences, numbers in ``encoding/json``'s float64 format (``1e6`` -> ``1000000``,
  ``1e-7`` -> ``1e-7``, ``1e21`` -> ``1e+21``);
- other top-level scalars as Go's ``fmt.Sprint`` prints the decoded value: numbers in
  ``strconv.FormatFloat(f, 'g', -1, 64)`` (``1e6`` -> ``1e+06``, ``1e-7`` -> ``1e-07``), booleans
  ``true``/``false``, null ``<nil>`` (go-infer itself only handled strings there).

``style="python"`` is the same string with objects written by ``json.dumps(sort_keys=True,
ensure_ascii=False, separators=(",", ":"))``, as go-infer's own Python test client signs ``data``;
the gateway may accept either (``AcceptPythonJson``).

SHA256: base64 of the lower-case hex digest. SM2: SM2 with SM3, user id ``1234567812345678``,
signature ``r || s`` (32 bytes each) in base64.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import math
import re
import secrets
from collections.abc import Mapping
from typing import Any, Literal

Style = Literal["go", "python"]

#: SM2's curve order n and field prime p (GB/T 32918.5; the same table gmssl uses).
_SM2_N = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123", 16)
_SM2_P = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF", 16)
_SM2_A = int("FFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC", 16)
_SM2_B = int("28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93", 16)
_GO_HTML_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_HTML = re.compile("[<>&\u2028\u2029]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


# --- numbers as Go writes a float64 -------------------------------------------------------------

def _shortest_digits(f: float) -> tuple[str, int]:
    """The shortest decimal digits that read back as ``abs(f)``, and the decimal point position:
    ``abs(f) == 0.<digits> * 10**point``. Python's repr and Go both pick the shortest round-trip
    digits (the closest one when several exist)."""
    mantissa, _, exponent = repr(abs(f)).partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    leading_zeros = len(digits) - len(digits.lstrip("0"))
    point = len(whole) + int(exponent or 0) - leading_zeros
    return digits.strip("0"), point


def _fixed(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * -point + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


def _scientific(digits: str, point: int) -> str:
    exponent = point - 1
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{mantissa}e{'-' if exponent < 0 else '+'}{abs(exponent):02d}"


def go_format_g(f: float) -> str:
    """Go's ``strconv.FormatFloat(f, 'g', -1, 64)`` (what ``fmt.Sprint`` prints for a float64):
    %e when the exponent is < -4 or >= 6 (the shortest-precision cut-off), else %f."""
    if math.isnan(f) or math.isinf(f):
        return "NaN" if math.isnan(f) else ("+Inf" if f > 0 else "-Inf")
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0"
    digits, point = _shortest_digits(f)
    exponent = point - 1
    if exponent < -4 or exponent >= 6:
        return sign + _scientific(digits, point)
    return sign + _fixed(digits, point)


def go_json_number(f: float) -> str:
    """A float64 as Go's ``encoding/json`` writes it: %f, or %e below 1e-6 and from 1e21 on, with
    a one-digit negative exponent unpadded (``1e-7``, not ``1e-07``)."""
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"{f} is not representable in JSON")
    if 1e-4 <= abs(f) < 1e16:  # repr's fixed range, inside Go's: the same shortest digits
        text = repr(f)
        return text[:-2] if text.endswith(".0") else text
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0"
    digits, point = _shortest_digits(f)
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        text = _scientific(digits, point)
        if text[-4:-1] == "e-0":  # Go: clean up e-09 to e-9
            text = text[:-2] + text[-1]
        return sign + text
    return sign + _fixed(digits, point)


# --- JSON as Go's json.Marshal writes it ----------------------------------------------------------

#: Integers up to this magnitude are exact in a float64 (an array of them, such as an image's
#: bytes, is written in one join: a forged 16 MB body costs a check worker seconds, not minutes).
_EXACT = 2**53


def _go_string(text: str) -> str:
    text = _LONE_SURROGATE.sub("\ufffd", text)  # Go decodes a lone surrogate escape to U+FFFD
    quoted = json.dumps(text, ensure_ascii=False)
    return _GO_HTML.sub(lambda m: _GO_HTML_ESCAPES[m.group()], quoted)


def go_json(value: Any) -> str:
    """``json.Marshal`` of what Go's ``json.Unmarshal`` made of ``value`` (numbers are float64)."""
    if isinstance(value, str):
        return _go_string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return go_json_number(float(value))
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{_go_string(k)}:{go_json(value[k])}" for k in sorted(value)) + "}"
    if isinstance(value, list | tuple):
        if value and set(map(type, value)) == {int} and max(map(abs, value)) <= _EXACT:
            return "[" + ",".join(map(str, value)) + "]"  # float64 holds each exactly: Go prints its digits
        return "[" + ",".join(go_json(v) for v in value) + "]"
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _python_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _field_text(key: str, value: Any, style: Style) -> str:
    if key == "timestamp" and isinstance(value, int | float) and not isinstance(value, bool):
        return str(int(value))
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping | list | tuple):
        return go_json(value) if style == "go" else _python_json(value)
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    return go_format_g(float(value))


def canonical_string(fields: Mapping[str, Any], secret: str, *, style: Style = "go") -> str:
    """The string go-infer signs: every field but ``signData``, sorted, ``k=v&...&key=<secret>``."""
    parts = [f"{k}={_field_text(k, fields[k], style)}" for k in sorted(fields) if k != "signData"]
    return "&".join([*parts, f"key={secret}"])


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


# --- SHA256 -------------------------------------------------------------------------------------

def sha256_signature(signing_string: str) -> str:
    """base64 of the lower-case hex digest (go-infer's ``signType: SHA256``)."""
    return base64.b64encode(hashlib.sha256(_utf8(signing_string)).hexdigest().encode("ascii")).decode("ascii")


def sha256_matches(signing_string: str, sign_data: str) -> bool:
    """Constant-time comparison, so the time taken says nothing about how much of it was right."""
    return hmac.compare_digest(sha256_signature(signing_string).encode("ascii"), _utf8(sign_data))


# --- SM2 with SM3 (gmssl) -----------------------------------------------------------------------

class Sm2KeyError(ValueError):
    """An SM2 key setting that cannot be used."""


def _decode_key(text: str, what: str, sizes: tuple[int, ...]) -> bytes:
    """A key given as hex or as base64 (go-infer's settings use base64)."""
    text = text.strip()
    candidates = []  # base64 first (go-infer's setting); 64 or 128 hex digits never decode to a valid size
    with contextlib.suppress(binascii.Error):
        candidates.append(base64.b64decode(text, validate=True))
    if re.fullmatch(r"[0-9a-fA-F]+", text) and len(text) % 2 == 0:
        candidates.append(bytes.fromhex(text))
    for raw in candidates:
        if len(raw) in sizes:
            return raw
    raise Sm2KeyError(f"{what}: expected hex or base64 of {' or '.join(map(str, sizes))} bytes")


def _on_curve(x: int, y: int) -> bool:
    return x < _SM2_P and y < _SM2_P and (y * y - (x * x * x + _SM2_A * x + _SM2_B)) % _SM2_P == 0


def _crypt(private_hex: str, public_hex: str):
    from gmssl import sm2

    crypt = sm2.CryptSM2(private_key=private_hex, public_key=public_hex)
    crypt.public_key = public_hex  # gmssl's constructor lstrip("04")s keys whose x starts with 04
    return crypt


#: go-infer's (and gmssl's) SM2 user id, "1234567812345678", 16 bytes = 128 bits (ENTL 0x0080).
_SM2_USER_ID = b"\x00\x80" + b"1234567812345678"


def _sm3(data: bytes) -> bytes:
    """SM3 from OpenSSL when this Python's has it (16 MB in ~60 ms; gmssl's pure-Python hash took
    87 s, which let one forged SM2 body hold a check worker for minutes), else gmssl's."""
    if "sm3" in hashlib.algorithms_available:
        return hashlib.new("sm3", data).digest()
    from gmssl import func, sm3

    return bytes.fromhex(sm3.sm3_hash(func.bytes_to_list(data)))


def _sm2_digest(crypt, message: bytes) -> bytes:
    """e = SM3(Z || M), Z = SM3(ENTL || ID || a || b || G || public key): what gmssl's
    ``sign_with_sm3`` and ``verify_with_sm3`` sign, with the hash above."""
    table = crypt.ecc_table
    z = _sm3(_SM2_USER_ID + bytes.fromhex(table["a"] + table["b"] + table["g"] + crypt.public_key))
    return _sm3(z + message)


def sm2_public_key_from_private(private_key: str) -> str:
    """The public key (128 hex digits, x || y) of a private key in hex or base64 (go-infer's
    ``SM2PrivateKey`` is the big-endian scalar in base64)."""
    scalar = int.from_bytes(_decode_key(private_key, "SM2 private key", tuple(range(1, 33))), "big")
    if not 1 <= scalar < _SM2_N - 1:
        raise Sm2KeyError("SM2 private key: out of range")
    from gmssl import sm2

    crypt = sm2.CryptSM2(private_key=f"{scalar:064x}", public_key="")
    return crypt._kg(scalar, sm2.default_ecc_table["g"])  # scalar * G; gmssl has no public name for it


def sm2_public_key(public_key: str) -> str:
    """A public key (hex or base64; 64 bytes x || y, or 65 with the 04 prefix), checked to lie on
    the curve; returned as 128 hex digits."""
    raw = _decode_key(public_key, "SM2 public key", (64, 65))
    if len(raw) == 65:
        if raw[0] != 4:
            raise Sm2KeyError("SM2 public key: a 65-byte key must start with 04 (uncompressed)")
        raw = raw[1:]
    x, y = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")
    if not _on_curve(x, y):
        raise Sm2KeyError("SM2 public key: not a point on the SM2 curve")
    return raw.hex()


def sm2_sign(signing_string: str, private_key: str) -> str:
    """SM2-with-SM3 signature of the string, base64 of r || s (what go-infer's clients send)."""
    scalar = int.from_bytes(_decode_key(private_key, "SM2 private key", tuple(range(1, 33))), "big")
    crypt = _crypt(f"{scalar:064x}", sm2_public_key_from_private(private_key))
    while True:
        nonce = f"{secrets.randbelow(_SM2_N - 1) + 1:064x}"  # gmssl's default nonce is not a CSPRNG
        signature = crypt.sign(_sm2_digest(crypt, _utf8(signing_string)), nonce)
        if signature:
            return base64.b64encode(bytes.fromhex(signature)).decode("ascii")


class Sm2Verifier:
    """Verifies go-infer's SM2 signatures with one public key (128 hex digits)."""

    def __init__(self, public_key_hex: str):
        self._crypt = _crypt("", sm2_public_key(public_key_hex))

    @classmethod
    def from_settings(cls, private_key: str | None, public_key: str | None) -> Sm2Verifier:
        derived = sm2_public_key_from_private(private_key) if private_key else None
        given = sm2_public_key(public_key) if public_key else None
        if derived and given and derived != given:
            raise Sm2KeyError("SM2PrivateKey and SM2PublicKey are not a key pair")
        key = given or derived
        if key is None:
            raise Sm2KeyError("no SM2 key configured")
        return cls(key)

    def verify(self, signing_string: str, sign_data: bytes) -> bool:
        """``sign_data`` is the decoded signature: exactly 64 bytes, r and s in [1, n-1]."""
        if len(sign_data) != 64:
            return False
        r, s = int.from_bytes(sign_data[:32], "big"), int.from_bytes(sign_data[32:], "big")
        if not (1 <= r < _SM2_N and 1 <= s < _SM2_N):
            return False  # gmssl does not check the range itself
        try:
            return bool(self._crypt.verify(sign_data.hex(), _sm2_digest(self._crypt, _utf8(signing_string))))
        except (ValueError, TypeError, IndexError):
            return False


def decode_signature(sign_data: str) -> bytes | None:
    """Canonical base64 only; None otherwise. No line breaks or other whitespace, correct padding,
    and unused trailing bits zero (the encoding of the decoded bytes must give back ``sign_data``):
    one signature has exactly one spelling, so a replayed request cannot pass for a new one by
    changing how its signature is written."""
    try:
        raw = base64.b64decode(sign_data, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if base64.b64encode(raw).decode("ascii") == sign_data else None
