"""The REST gateway end to end: `toolkit gateway` (a real uvicorn process) -> the real tritonserver
serving the example's embedding and mobile ensembles (`example_server`), over real HTTP.
Also: `toolkit serve --restrict-apis` refusing Triton's admin APIs without the header."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from bounded import read_until
from PIL import Image
from serving import free_ports

from toolkit.client import TritonClient
from toolkit.errors import GatewayError
from toolkit.gateway.mapping import discover_routes
from toolkit.gateway.settings import parse_settings
from toolkit.gateway.signing import canonical_string, sha256_signature, sm2_sign

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
ROOT = Path(__file__).parents[2]
EXAMPLE_SETTINGS = yaml.safe_load((ROOT / "gateway.yaml").read_text())  # the repository's example, as shipped
(APP, SECRET), = EXAMPLE_SETTINGS["API"]["AppIdSecret"].items()
SM2_PRIVATE = EXAMPLE_SETTINGS["API"]["SM2PrivateKey"]
SENTENCES = ["Triton serves this sentence.", "你好，世界。", "Grüße aus München, café crème.", "a",
             "emoji 🚀 and symbols ∑ ≠ ∞ < & >", "The quick brown fox jumps over the lazy dog.",
             "serving models with dynamic batching", "go-infer clients keep working unchanged"]


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log: Path


def wait_until_live(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"gateway not live after {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def gateway(example_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("gateway")
    settings = root / "gateway.yaml"
    example = {**EXAMPLE_SETTINGS, "API": {**EXAMPLE_SETTINGS["API"], "MaxBodyBytes": 1 << 20,
                                           "RateLimit": {"PerSecond": 0, "Burst": 1}},  # a load test
               "Triton": {**EXAMPLE_SETTINGS["Triton"], "Timeout": 60}}
    settings.write_text(yaml.safe_dump(example))
    (port,) = free_ports(1)
    log = root / "gateway.log"
    semaphores = _semaphores()
    with open(log, "wb") as out:
        process = subprocess.Popen([*TOOLKIT, "gateway", "--settings", str(settings), "--triton",
                                    example_server.grpc_url, "--port", str(port)],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_live(url, process, log)
        yield Gateway(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=40)
    # uvicorn drains; the gateway exits 0 saying which signal stopped it
    text = log.read_text()
    assert code == 0 and "Application shutdown complete" in text and "Gateway stopped (SIGTERM)." in text, text[-3000:]
    # its CheckWorkers pool's queues (named semaphores) go with it: five were left per gateway before
    assert _semaphores() - semaphores == set()


def _semaphores() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("sem.mp-*")}


def signed(data: dict, *, sign_type: str = "SHA256", **extra) -> dict:
    body = {"appId": APP, "version": "1", "signType": sign_type, "encType": "plain",
            "timestamp": int(time.time()), "data": data, **extra}
    text = canonical_string(body, SECRET)
    body["signData"] = sha256_signature(text) if sign_type == "SHA256" else sm2_sign(text, SM2_PRIVATE)
    return body


def call(gateway: Gateway, path: str, body: dict | bytes) -> tuple[int, dict]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{gateway.url}/api/{path}", content=content, timeout=60)
    return response.status_code, response.json()


def direct(server, model: str, tensor: str, items: list[bytes]) -> np.ndarray:
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        return client.infer(model, {tensor: np.array([[i] for i in items], dtype=object)})["EMBEDDING"]


def png(seed: int, size: int = 96) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_gateway_embedding_equals_triton_direct_when_sent_one_text_or_a_list(gateway, example_server):
    expected = direct(example_server, "embedding", "TEXT", [s.encode() for s in SENTENCES])
    status, one = call(gateway, "embedding", signed({"text": SENTENCES[1]}))
    assert (status, one["code"], one["success"], one["appId"]) == (200, 0, True, APP)
    np.testing.assert_array_equal(np.array(one["data"]["embeddings"], dtype=np.float32),
                                  direct(example_server, "embedding", "TEXT", [SENTENCES[1].encode()])[0])
    status, many = call(gateway, "embedding", signed({"text": SENTENCES}, sign_type="SM2"))
    assert (status, many["code"]) == (200, 0), many
    np.testing.assert_array_equal(np.array(many["data"]["embeddings"], dtype=np.float32), expected)


def test_gateway_mobile_equals_triton_direct_when_sent_base64_images(gateway, example_server):
    images = [png(1), png(2, size=130)]
    expected = direct(example_server, "mobile", "IMAGE", images)
    status, answer = call(gateway, "mobile", signed({"image": [base64.b64encode(i).decode() for i in images]}))
    assert (status, answer["code"]) == (200, 0), answer
    served = np.array(answer["data"]["embeddings"], dtype=np.float32)
    assert served.shape == (2, 1280)
    np.testing.assert_array_equal(served, expected)


@pytest.mark.parametrize(("path", "data", "code", "message"), [
    ("embedding", {"text": "   "}, 1001, "TEXT[0] is empty or only whitespace"),
    ("mobile", {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n garbage").decode()}, 1101, "not a valid image"),
    ("embedding", {"image": "aGk="}, 9801, "missing parameter: data.text"),
    ("nowhere", {"text": "x"}, 9709, "unknown path"),
])
def test_gateway_answers_hook_or_gateway_code_when_triton_or_the_gateway_rejects_data(gateway, path, data, code,
                                                                                       message):
    status, answer = call(gateway, path, signed(data))
    assert (status, answer["code"], answer["success"]) == (200, code, False)
    assert message in answer["data"]["msg"] and "Traceback" not in answer["data"]["msg"]


def test_gateway_answers_envelope_over_a_real_socket_when_body_is_not_json_or_too_large(gateway):
    assert call(gateway, "embedding", b"\x00 not json")[1]["code"] == 9801
    status, answer = call(gateway, "embedding", json.dumps({"pad": "x" * (1 << 20)}).encode())
    assert (status, answer["code"], answer["data"]["msg"]) == (413, 9801, "request body is larger than 1048576 bytes")
    assert httpx.get(gateway.url + "/").text == "Hello world."  # the worker is still there


async def _post_keep_alive(reader, writer, host: str, path: str, body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 POST on an open connection (a minimal client: the load test's own CPU should go to
    the gateway and Triton, not to an HTTP library)."""
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    length = int({k.lower(): v for k, v in headers.items()}["content-length"])
    return int(lines[0].split()[1]), await reader.readexactly(length)


async def _send_all(url: str, bodies: list[bytes], concurrency: int) -> list[tuple[float, int, dict | str]]:
    """Every body over ``concurrency`` keep-alive connections; (latency, status, answer) in order."""
    parsed = httpx.URL(url)
    results: list = [None] * len(bodies)
    pending = iter(range(len(bodies)))

    async def worker():
        reader, writer = await asyncio.wait_for(asyncio.open_connection(parsed.host, parsed.port), 30)
        try:
            for i in pending:
                started = time.perf_counter()
                try:
                    status, content = await asyncio.wait_for(
                        _post_keep_alive(reader, writer, parsed.netloc.decode(), parsed.path, bodies[i]), 60)
                    results[i] = (time.perf_counter() - started, status, json.loads(content))
                except Exception as e:  # recorded, and counted as a lost request
                    results[i] = (time.perf_counter() - started, 0, repr(e))
                    return
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_gateway_answers_2000_signed_requests_at_concurrency_32_with_none_lost_and_all_correct(
        gateway, example_server):
    expected = direct(example_server, "embedding", "TEXT", [s.encode() for s in SENTENCES])
    bodies = [json.dumps(signed({"text": SENTENCES[i % len(SENTENCES)]}, nonce=i)).encode() for i in range(2000)]
    gateway_cpu, client_cpu, started = cpu_seconds(gateway.process.pid), time.process_time(), time.perf_counter()
    results = asyncio.run(_send_all(f"{gateway.url}/api/embedding", bodies, concurrency=32))
    wall = time.perf_counter() - started
    gateway_cpu, client_cpu = cpu_seconds(gateway.process.pid) - gateway_cpu, time.process_time() - client_cpu
    failures = [(i, r) for i, r in enumerate(results)
                if r is None or r[1] != 200 or not isinstance(r[2], dict) or r[2]["code"]]
    assert not failures, failures[:5]
    served = np.array([r[2]["data"]["embeddings"] for r in results], dtype=np.float32)
    deviation = np.abs(served - expected[np.arange(2000) % len(SENTENCES)]).max()
    assert deviation < 1e-5  # batch composition may change the last float bits, nothing more
    assert len({r[2]["data"]["requestId"] for r in results}) == 2000
    latencies = np.array([r[0] for r in results]) * 1000
    print(f"\n2000 requests, concurrency 32: {wall:.2f}s wall, {2000 / wall:.0f} req/s, 0 errors, "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, "
          f"max deviation from Triton direct {deviation:.1e}; CPU per request: gateway "
          f"{gateway_cpu / 2:.2f} ms, test client {client_cpu / 2:.2f} ms")


@pytest.mark.parametrize("sign_type", ["SHA256", "SM2"])
def test_gateway_client_example_gets_an_embedding_when_it_signs_like_go_infer(gateway, sign_type):
    done = subprocess.run([sys.executable, str(ROOT / "clients" / "gateway_client.py"), "embedding", "你好, Triton",
                           "--url", gateway.url, "--sign-type", sign_type],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "code 0, success" in done.stdout and "embeddings: dim 384" in done.stdout


def test_gateway_log_names_request_ids_but_no_secret_when_requests_were_served(gateway):
    _, answer = call(gateway, "embedding", {**signed({"text": "log me"}), "signData": sha256_signature("forged")})
    time.sleep(0.2)
    log = gateway.log.read_text()
    assert answer["data"]["requestId"] in log and "code=9800" in log
    assert SECRET not in log and "Traceback" not in log


@pytest.fixture(scope="module")
def restricted_triton(tmp_path_factory):
    """`toolkit serve --restrict-apis` on an empty repository (starts in well under a second)."""
    root = tmp_path_factory.mktemp("restricted")
    (root / "repo").mkdir()
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "TOOLKIT_RESTRICT_APIS": "admin-key=s3cret-Value"}
    process = subprocess.Popen([*TOOLKIT, "serve", "--repository", str(root / "repo"), "--http-port", str(http),
                                "--grpc-port", str(grpc), "--metrics-port", str(metrics),
                                "--log-file", str(root / "triton.log")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = read_until(process, "Press Ctrl-C", 120)
        assert any("Triton is ready" in line for line in lines), "".join(lines)
        yield f"127.0.0.1:{http}", f"127.0.0.1:{grpc}"
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)


def test_serve_refuses_admin_apis_without_the_header_when_started_with_restrict_apis(restricted_triton):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    http, grpc = restricted_triton
    for path, method in [("/v2/repository/index", "POST"), ("/v2/logging", "GET"), ("/v2/trace/setting", "GET"),
                         ("/v2/systemsharedmemory/status", "GET")]:
        refused = httpx.request(method, f"http://{http}{path}", content=b"{}" if method == "POST" else None)
        assert refused.status_code == 403 and "restricted" in refused.text, path
        allowed = httpx.request(method, f"http://{http}{path}", content=b"{}" if method == "POST" else None,
                                headers={"admin-key": "s3cret-Value"})
        assert allowed.status_code == 200, (path, allowed.text)
    assert httpx.get(f"http://{http}/v2/health/ready").status_code == 200  # health stays open
    client = grpcclient.InferenceServerClient(grpc)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.get_model_repository_index()
    assert client.get_model_repository_index(headers={"triton-grpc-protocol-admin-key": "s3cret-Value"}) is not None
    client.close()


def test_gateway_discovery_needs_admin_header_when_triton_restricts_its_repository_api(restricted_triton):
    _, grpc = restricted_triton
    settings = {"API": {"AppIdSecret": {APP: SECRET}}, "Triton": {"Url": grpc}}
    with pytest.raises(GatewayError, match=r"restricted: set Triton\.AdminHeader"):
        discover_routes(parse_settings(settings))
    settings["Triton"]["AdminHeader"] = "admin-key=s3cret-Value"
    with pytest.raises(GatewayError, match=r"serves no model with a toolkit\.api_path"):  # got past the restriction
        discover_routes(parse_settings(settings))
