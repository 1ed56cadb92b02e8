"""go-infer's signature: Go's number spellings, the string to sign, SHA256 and SM2 (gmssl).

The vectors are hand-computed from Go's rules (strconv.FormatFloat 'g' -1, encoding/json), or
published by go-infer itself (doc/API.md: the SHA256 result and an SM2 signature made with its demo
key; examples/utils/sm2.py: the demo key's public key), so they do not come from the code under test.
"""

from __future__ import annotations

import base64
import math
import random

import pytest

from toolkit.gateway import signing
from toolkit.gateway.signing import (
    Sm2KeyError,
    Sm2Verifier,
    canonical_string,
    decode_signature,
    go_format_g,
    go_json,
    go_json_number,
    sha256_matches,
    sha256_signature,
    sm2_public_key,
    sm2_public_key_from_private,
    sm2_sign,
)

# go-infer's published demo values (doc/API.md, doc/DEV.md, examples/utils/sm2.py)
GOINFER_SECRET = "41DF0E6AE27B5282C07EF5124642A352"
GOINFER_SM2_PRIVATE = "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="
GOINFER_SM2_PUBLIC = ("4f1df6069a086ac4e1d1c4ad60a3ab26a19ba5fc97a45dedf386c7480dcab18f"
                      "a745c3a0f6dba6ed6993d0367d9f6b12c06dc01d4079c9eda3f807e21f93edc6")
GOINFER_FIELDS = {"appId": "3EA25569454745D01219080B779F021F", "version": "1", "signType": "SHA256",
                  "signData": "...", "encType": "plain", "timestamp": 1658716494,
                  "data": {"text": "测试测试", "image": ""}}
GOINFER_STRING = ('appId=3EA25569454745D01219080B779F021F&data={"image":"","text":"测试测试"}&encType=plain'
                  '&signType=SHA256&timestamp=1658716494&version=1&key=41DF0E6AE27B5282C07EF5124642A352')
GOINFER_SHA256 = "YTY4YzFiODUyYTY1MDMxNGFmYWFkNjg0ZjM2NTJjMzM2YzliOTY5ZTk0MzgyNWEyOTM4MGI1MTZkZTc0NmVjZQ=="
GOINFER_SM2_SIGNATURE = "ILSOY5A0/sfW5Y9T6rIjl1AEPlDtQeqtwAxLibNbnajlj2fY/DxvTuSok+sqxy2St4pvvs4/rdaNOCNpwBuJ6A=="


@pytest.mark.parametrize(("value", "expected"), [
    (0.1, "0.1"), (1e21, "1e+21"), (100000.0, "100000"), (1e6, "1e+06"), (1e-7, "1e-07"), (12, "12"),
    (1.5e300, "1.5e+300"), (0.0001, "0.0001"), (0.00001, "1e-05"), (123456.7, "123456.7"),
    (1234567, "1.234567e+06"), (-2.5, "-2.5"), (0.0, "0"), (-0.0, "-0"), (5e-324, "5e-324"),
    (1.7976931348623157e308, "1.7976931348623157e+308"), (0.30000000000000004, "0.30000000000000004"),
    (2**53 + 1, "9.007199254740992e+15"),  # a JSON integer becomes the nearest float64 in Go
    (1e20, "1e+20"), (100.0, "100"), (float("nan"), "NaN"), (float("-inf"), "-Inf"),
])
def test_go_format_g_matches_go_strconv_when_formatting_a_float64(value, expected):
    assert go_format_g(float(value)) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (0.1, "0.1"), (1e21, "1e+21"), (100000.0, "100000"), (1e6, "1000000"), (1e20, "100000000000000000000"),
    (1e-6, "0.000001"), (1e-7, "1e-7"), (1.5e-9, "1.5e-9"), (1e-10, "1e-10"), (12, "12"),
    (1.5e300, "1.5e+300"), (-0.0, "-0"), (12345678901234567890, "12345678901234567000"),
])
def test_go_json_number_matches_go_encoding_json_when_marshalling_a_float64(value, expected):
    assert go_json_number(float(value)) == expected


def test_go_json_sorts_keys_and_escapes_html_but_not_non_ascii_when_marshalling_an_object():
    value = {"z": [1, 2.5, None, True], "a": {"y": "é <x> & 你好\u2028", "b": False}, "q": "\"\\\n\x01"}
    assert go_json(value) == ('{"a":{"b":false,"y":"é \\u003cx\\u003e \\u0026 你好\\u2028"},'
                              '"q":"\\"\\\\\\n\\u0001","z":[1,2.5,null,true]}')


def test_canonical_string_equals_go_infer_documented_string_when_signing_its_example():
    assert canonical_string(GOINFER_FIELDS, GOINFER_SECRET) == GOINFER_STRING


def test_sha256_signature_equals_go_infer_documented_result_when_signing_its_example():
    assert sha256_signature(GOINFER_STRING) == GOINFER_SHA256
    assert sha256_matches(GOINFER_STRING, GOINFER_SHA256)
    assert not sha256_matches(GOINFER_STRING + "x", GOINFER_SHA256)
    assert not sha256_matches(GOINFER_STRING, "é" + GOINFER_SHA256[1:])  # non-ASCII input is no crash


def test_canonical_string_spells_each_value_as_go_when_extra_fields_nest_floats_ints_and_non_ascii():
    fields = {"appId": "app", "version": "1", "signType": "SHA256", "signData": "left out", "encType": "plain",
              "timestamp": 1700000000,
              "data": {"text": "你好 <b>&", "n": 12, "x": 0.1, "big": 1000000.0, "tiny": 1e-7,
                       "nested": {"b": [1, 2.5], "a": True, "z": None}},
              "extra": {"z": 1, "a": "é"}, "ratio": 1e-7, "count": 1000000, "flag": True}
    expected = ('appId=app&count=1e+06'
                '&data={"big":1000000,"n":12,"nested":{"a":true,"b":[1,2.5],"z":null},'
                '"text":"你好 \\u003cb\\u003e\\u0026","tiny":1e-7,"x":0.1}'
                '&encType=plain&extra={"a":"é","z":1}&flag=true&ratio=1e-07&signType=SHA256'
                '&timestamp=1700000000&version=1&key=secret')
    assert canonical_string(fields, "secret") == expected
    # the same computed by `printf %s "$expected" | sha256sum | cut -d' ' -f1 | tr -d '\n' | base64`
    assert sha256_signature(expected) == ("NGIyNDc2MWE1ZjFjMzZkZDAyODMxN2FiZTY1ZWE4YWI2NTRjZjVhMGRj"
                                          "NTJjYzRiZWM3NzFlYjgzNTFkMDE5MA==")


def test_canonical_string_writes_data_as_python_json_dumps_when_style_is_python():
    fields = {"appId": "a", "timestamp": 1700000000.9, "data": {"t": "<&>", "f": 2.0, "e": 1e-7}}
    assert canonical_string(fields, "s", style="python") == \
        'appId=a&data={"e":1e-07,"f":2.0,"t":"<&>"}&timestamp=1700000000&key=s'
    assert canonical_string(fields, "s") == \
        'appId=a&data={"e":1e-7,"f":2,"t":"\\u003c\\u0026\\u003e"}&timestamp=1700000000&key=s'


def test_sm2_public_key_from_private_equals_go_infer_public_key_when_given_its_base64_private_key():
    assert sm2_public_key_from_private(GOINFER_SM2_PRIVATE) == GOINFER_SM2_PUBLIC
    assert sm2_public_key_from_private(base64.b64decode(GOINFER_SM2_PRIVATE).hex()) == GOINFER_SM2_PUBLIC


def test_sm2_verifier_accepts_go_infer_published_signature_when_checking_its_documented_string():
    verifier = Sm2Verifier.from_settings(GOINFER_SM2_PRIVATE, None)
    signature = decode_signature(GOINFER_SM2_SIGNATURE)
    assert verifier.verify(GOINFER_STRING, signature)
    assert not verifier.verify(GOINFER_STRING.replace("测试测试", "测试"), signature)


def test_sm2_sign_then_verify_round_trips_when_the_string_is_unchanged():
    text = 'appId=x&data={"text":"你好"}&key=s'
    signature = sm2_sign(text, GOINFER_SM2_PRIVATE)
    raw = decode_signature(signature)
    assert len(raw) == 64
    verifier = Sm2Verifier.from_settings(None, "04" + GOINFER_SM2_PUBLIC)  # the public key alone
    assert verifier.verify(text, raw)
    assert not verifier.verify(text + " ", raw)
    assert not verifier.verify(text, raw[:32] + bytes([raw[32] ^ 1]) + raw[33:])
    assert sm2_sign(text, GOINFER_SM2_PRIVATE) != signature  # a fresh random nonce each time


@pytest.mark.parametrize("raw", [bytes(64), bytes(63), bytes(65), b"\xff" * 64])
def test_sm2_verifier_rejects_signature_when_r_or_s_is_out_of_range_or_length_is_wrong(raw):
    assert not Sm2Verifier(GOINFER_SM2_PUBLIC).verify("anything", raw)


def test_sm2_public_key_accepts_base64_and_hex_with_prefix_when_the_point_is_on_the_curve():
    raw = bytes.fromhex("04" + GOINFER_SM2_PUBLIC)
    assert sm2_public_key(base64.b64encode(raw).decode()) == GOINFER_SM2_PUBLIC
    assert sm2_public_key(base64.b64encode(raw[1:]).decode()) == GOINFER_SM2_PUBLIC


@pytest.mark.parametrize(("private", "public", "message"), [
    (None, GOINFER_SM2_PUBLIC[:-1] + "7", "not a point on the SM2 curve"),
    (None, "abcd", "expected hex or base64 of 64 or 65 bytes"),
    (GOINFER_SM2_PRIVATE, "02" + GOINFER_SM2_PUBLIC, "must start with 04"),
    ("AAAA", GOINFER_SM2_PUBLIC, "out of range"),
    (base64.b64encode(bytes(31) + b"\x02").decode(), GOINFER_SM2_PUBLIC, "not a key pair"),
])
def test_sm2_verifier_from_settings_raises_naming_the_problem_when_a_key_is_unusable(private, public, message):
    with pytest.raises(Sm2KeyError, match=message):
        Sm2Verifier.from_settings(private, public)


@pytest.mark.parametrize(("text", "expected"), [
    ("YWJj", b"abc"), ("YWI=", b"ab"), ("", b""),
    # One signature, one spelling: line breaks, missing padding and non-zero unused bits are refused,
    # so a captured request cannot be replayed by respelling its signature.
    ("YW\nJj", None), ("YWJj\r\n", None), ("YWJ", None), ("YWI", None), ("YWJ=", None), ("YW*j", None),
    (" YWJj", None),
])
def test_decode_signature_accepts_only_canonical_base64(text, expected):
    assert decode_signature(text) == expected


def _slow_number(f: float) -> str:
    """go_json_number's digit-by-digit path alone (what the fast paths must equal)."""
    sign = "-" if math.copysign(1.0, f) < 0 else ""
    if f == 0:
        return sign + "0"
    digits, point = signing._shortest_digits(f)
    if abs(f) < 1e-6 or abs(f) >= 1e21:
        return sign + signing._scientific(digits, point).replace("e-0", "e-")
    return sign + signing._fixed(digits, point)


def test_go_json_fast_paths_spell_numbers_as_the_digit_by_digit_path_does():
    rng = random.Random(7)
    floats = [rng.uniform(-1, 1) * 10.0 ** rng.randint(-8, 22) for _ in range(20000)]
    floats += [1e-4, 9.999999999999999e-05, 1e16, 9999999999999998.0, 123.0, -0.5, 0.1 + 0.2, 2.0**53]
    assert [go_json_number(f) for f in floats] == [_slow_number(f) for f in floats]
    ints = [rng.randint(-2**53, 2**53) for _ in range(5000)] + [0, 2**53, -2**53, 255]
    assert go_json(ints) == "[" + ",".join(_slow_number(float(i)) for i in ints) + "]"
    beyond = [1, 2**53 + 1, 10**22]  # not exact in a float64: Go prints the float64's digits
    assert go_json(beyond) == "[1,9007199254740992,1e+22]"
    assert go_json([True, 1, None]) == "[true,1,null]"
