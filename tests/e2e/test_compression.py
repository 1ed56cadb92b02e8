"""Compressed transport (Paddle Serving 5.1): the library client with gzip/deflate gets exactly the
answers it gets without, over HTTP and gRPC, and the bytes on the wire shrink where the data allows."""

from __future__ import annotations

import gzip
import json
import urllib.request

import numpy as np
import pytest

from toolkit.client import TritonClient
from toolkit.errors import InferenceError

pytestmark = pytest.mark.e2e
TEXTS = np.array([[b"compressed transport keeps every answer the same"], [b"a second sentence"]], dtype=object)


@pytest.mark.parametrize(("protocol", "compression"), [("http", "gzip"), ("http", "deflate"), ("grpc", "gzip")])
def test_compressed_calls_get_identical_answers(example_server, protocol, compression):
    url = example_server.http_url if protocol == "http" else example_server.grpc_url
    with TritonClient(url, protocol=protocol) as plain, \
            TritonClient(url, protocol=protocol, compression=compression) as packed:
        expected = plain.infer("embedding", {"TEXT": TEXTS})["EMBEDDING"]
        got = packed.infer("embedding", {"TEXT": TEXTS})["EMBEDDING"]
    np.testing.assert_array_equal(got, expected)


def test_triton_answers_gzip_when_asked_and_the_body_shrinks(example_server):
    body = json.dumps({"inputs": [{"name": "TEXT", "shape": [2, 1], "datatype": "BYTES",
                                   "data": [t[0].decode() for t in TEXTS]}]}).encode()
    sizes = {}
    for encoding in ("identity", "gzip"):
        request = urllib.request.Request(f"http://{example_server.http_url}/v2/models/embedding/infer", data=body,
                                         method="POST", headers={"Accept-Encoding": encoding})
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read()
            sizes[encoding] = len(raw)
            if encoding == "gzip":
                assert response.headers.get("Content-Encoding") == "gzip"
                raw = gzip.decompress(raw)
            assert len(json.loads(raw)["outputs"][0]["data"]) == 2 * 384
    assert sizes["gzip"] < 0.7 * sizes["identity"], sizes


def test_an_unknown_compression_is_a_clear_error():
    with pytest.raises(InferenceError, match="compression 'brotli'"):
        TritonClient("127.0.0.1:1", protocol="http", compression="brotli")


@pytest.mark.parametrize(("protocol", "compress"), [("http", "deflate"), ("grpc", "gzip")])
def test_toolkit_infer_compress_prints_the_same_answer(example_server, protocol, compress):
    import subprocess
    import sys

    url = example_server.http_url if protocol == "http" else example_server.grpc_url
    base = [sys.executable, "-m", "toolkit.cli", "infer", "embedding", "-i", 'TEXT=["same answer"]',
            "--protocol", protocol, "--url", url]
    plain = subprocess.run(base, capture_output=True, text=True, timeout=60)
    packed = subprocess.run([*base, "--compress", compress], capture_output=True, text=True, timeout=60)
    assert plain.returncode == packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout) == json.loads(plain.stdout)
