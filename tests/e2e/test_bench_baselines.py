"""The benchmark's baselines as its runner starts them: real processes on free ports, real signals.

Four servers start at once (naive FastAPI and PyTriton, for the embedding and the mobile workload)
on the freshly exported MiniLM and MobileNetV2, and must answer exactly what the in-process pipeline
computes from the same files: they differ from it only in how requests reach it. The last test stops
them all with SIGTERM and checks that nothing they started (tritonserver, python stubs, PyTriton's
helper processes, uvicorn workers) outlives them.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving import call_concurrently, free_ports

from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline, load_corpus, make_images
from toolkit.client import TritonClient
from toolkit.errors import InferenceError

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
WIDTH = {"embedding": 384, "mobile": 1280}
TEXTS = [*load_corpus()[:6], "Grüße aus München, café crème.", "你好，世界。", "a"]


@dataclass
class Baseline:
    name: str
    process: subprocess.Popen
    log: Path
    url: str  # naive: http://host:port; PyTriton: host:grpc_port
    grpc_port: int | None = None

    def log_tail(self) -> str:
        return f"\n--- {self.name} log ---\n" + self.log.read_text(errors="replace")[-4000:]


def launch(name: str, module: str, args: list[str], tmp: Path, url: str, grpc_port: int | None = None) -> Baseline:
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", f"toolkit.bench.servers.{module}", *args],
                                   stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return Baseline(name, process, log, url, grpc_port)


def start_naive(workload: str, model_dir: Path, tmp: Path) -> Baseline:
    (port,) = free_ports(1)
    args = ["--workload", workload, "--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    return launch(f"naive-{workload}", "naive", args, tmp, f"http://127.0.0.1:{port}")


def start_pytriton(workload: str, model_dir: Path, tmp: Path) -> Baseline:
    http, grpc, metrics = free_ports(3)
    args = ["--workload", workload, "--model-dir", str(model_dir), "--http-port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch-size", "64",
            "--max-queue-delay-us", "2000", "--log-file", str(tmp / f"triton-{workload}.log")]
    return launch(f"pytriton-{workload}", "pytriton_server", args, tmp, f"127.0.0.1:{grpc}", grpc)


def naive_ready(baseline: Baseline) -> bool:
    try:
        return httpx.get(f"{baseline.url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def pytriton_ready(baseline: Baseline) -> bool:
    line = re.search(r"^READY http=\d+ grpc=(\d+)$", baseline.log.read_text(errors="replace"), re.MULTILINE)
    return line is not None and int(line.group(1)) == baseline.grpc_port


def wait_until_ready(baselines: dict[str, Baseline], ready: dict[str, Callable[[Baseline], bool]]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    waiting = set(baselines)
    while waiting:
        for name in sorted(waiting):
            baseline = baselines[name]
            if baseline.process.poll() is not None:
                pytest.fail(f"{name} exited with {baseline.process.returncode}{baseline.log_tail()}")
            if ready[name](baseline):
                waiting.discard(name)
        if waiting and time.monotonic() > deadline:
            pytest.fail(f"not ready after {START_TIMEOUT:.0f}s: {sorted(waiting)}"
                        + "".join(baselines[n].log_tail() for n in sorted(waiting)))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def baselines(tmp_path_factory, minilm_export, mobilenet_export):
    """All four servers, started together so their start-ups overlap; stopped at the end if still up."""
    tmp = tmp_path_factory.mktemp("baselines")
    servers = [start_naive("embedding", minilm_export, tmp), start_naive("mobile", mobilenet_export, tmp),
               start_pytriton("embedding", minilm_export, tmp), start_pytriton("mobile", mobilenet_export, tmp)]
    running = {b.name: b for b in servers}
    try:
        wait_until_ready(running, {n: naive_ready if n.startswith("naive") else pytriton_ready for n in running})
        yield running
    finally:
        for baseline in servers:
            if baseline.process.poll() is None:
                baseline.process.send_signal(signal.SIGTERM)
        for baseline in servers:
            try:
                baseline.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                baseline.process.kill()
                baseline.process.wait(timeout=30)


@pytest.fixture(scope="module")
def embed(minilm_export) -> EmbeddingPipeline:
    return EmbeddingPipeline(minilm_export)


@pytest.fixture(scope="module")
def mobile(mobilenet_export) -> MobilePipeline:
    return MobilePipeline(mobilenet_export)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return make_images(5, seed=3)


def assert_same_mobile(served: np.ndarray, expected: np.ndarray) -> None:
    """Random-weight MobileNetV2 outputs are ~1e-11: compare relative to their scale, not absolutely."""
    assert served.shape == expected.shape and served.dtype == np.float32
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-4 * scale)


def post(baseline: Baseline, path: str, body: dict | str) -> httpx.Response:
    if isinstance(body, str):
        return httpx.post(f"{baseline.url}{path}", content=body, headers={"content-type": "application/json"},
                          timeout=60)
    return httpx.post(f"{baseline.url}{path}", json=body, timeout=60)


def b64(images: list[bytes]) -> list[str]:
    return [base64.b64encode(image).decode("ascii") for image in images]


def test_naive_embedding_answers_what_the_pipeline_computes_also_concurrently(baselines, embed):
    naive = baselines["naive-embedding"]
    response = post(naive, "/embedding", {"texts": TEXTS})
    assert response.status_code == 200, response.text
    served = np.array(response.json()["embeddings"], dtype=np.float32)
    assert served.shape == (len(TEXTS), WIDTH["embedding"])
    np.testing.assert_allclose(served, embed(TEXTS), atol=1e-6)
    with ThreadPoolExecutor(4) as pool:  # requests run side by side in FastAPI's threadpool
        answers = list(pool.map(lambda t: post(naive, "/embedding", {"texts": [t]}), TEXTS))
    for text, answer in zip(TEXTS, answers, strict=True):
        np.testing.assert_allclose(np.array(answer.json()["embeddings"], np.float32), embed([text]), atol=1e-6)


def test_naive_mobile_answers_what_the_pipeline_computes(baselines, mobile, images):
    response = post(baselines["naive-mobile"], "/mobile", {"images": b64(images)})
    assert response.status_code == 200, response.text
    assert_same_mobile(np.array(response.json()["embeddings"], dtype=np.float32), mobile(images))


@pytest.mark.parametrize(("server", "path", "body", "status", "says"), [
    ("naive-embedding", "/embedding", {"texts": ["fine", "   "]}, 400, "[1001]"),
    ("naive-embedding", "/embedding", {"texts": []}, 422, "at least 1"),
    ("naive-embedding", "/embedding", {"texts": ["x"] * 65}, 422, "at most 64"),
    ("naive-embedding", "/embedding", {"text": "wrong field"}, 422, "texts"),
    ("naive-embedding", "/embedding", '{"texts": ["\\ud800"]}', 400, "Unicode"),
    ("naive-embedding", "/embedding", "{not json", 422, "JSON"),
    ("naive-mobile", "/mobile", {"images": ["%%% not base64"]}, 422, "ase64"),
    ("naive-mobile", "/mobile", {"images": [base64.b64encode(b"GIF89a broken").decode()]}, 400, "[1101]"),
])
def test_naive_rejects_bad_input_with_4xx_and_keeps_serving(baselines, server, path, body, status, says):
    naive = baselines[server]
    response = post(naive, path, body)
    assert response.status_code == status, response.text
    assert says in response.text
    assert naive_ready(naive) and naive.process.poll() is None


def test_pytriton_embedding_has_the_ensembles_interface_and_answers_like_the_pipeline(baselines, embed):
    pytriton = baselines["pytriton-embedding"]
    with TritonClient(pytriton.url, protocol="grpc") as client:
        metadata = client.metadata("embedding")
        served = client.infer("embedding", {"TEXT": text_tensor(*TEXTS)})["EMBEDDING"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("TEXT", "BYTES", ["-1", "1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("EMBEDDING", "FP32", ["-1", "384"])]
    assert served.shape == (len(TEXTS), 384) and served.dtype == np.float32
    np.testing.assert_allclose(served, embed(TEXTS), atol=1e-5)


def test_pytriton_splits_a_dynamic_batch_back_to_each_request(baselines, embed):
    pytriton = baselines["pytriton-embedding"]
    requests = [{"TEXT": text_tensor(*TEXTS[i: i + 1 + i % 3])} for i in range(len(TEXTS))]
    results = call_concurrently(pytriton.url, "embedding", requests)
    for request, result in zip(requests, results, strict=True):
        assert not isinstance(result, InferenceError), result
        texts = [item.decode("utf-8") for item in request["TEXT"][:, 0]]
        np.testing.assert_allclose(result["EMBEDDING"], embed(texts), atol=1e-5)


def test_pytriton_returns_an_error_for_a_bad_text_and_keeps_serving(baselines, embed):
    with TritonClient(baselines["pytriton-embedding"].url, protocol="grpc") as client:
        with pytest.raises(InferenceError, match="empty or only whitespace"):
            client.infer("embedding", {"TEXT": text_tensor("   ")})
        served = client.infer("embedding", {"TEXT": text_tensor("still serving")})["EMBEDDING"]
    np.testing.assert_allclose(served, embed(["still serving"]), atol=1e-5)


def test_pytriton_mobile_has_the_ensembles_interface_and_answers_like_the_pipeline(baselines, mobile, images):
    pytriton = baselines["pytriton-mobile"]
    with TritonClient(pytriton.url, protocol="grpc") as client:
        metadata = client.metadata("mobile")
        served = client.infer("mobile", {"IMAGE": np.array([[i] for i in images], dtype=object)})["EMBEDDING"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("IMAGE", "BYTES", ["-1", "1"])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("EMBEDDING", "FP32", ["-1", "1280"])]
    assert_same_mobile(served, mobile(images))
    results = call_concurrently(pytriton.url, "mobile", [{"IMAGE": np.array([[i]], dtype=object)} for i in images])
    assert_same_mobile(np.concatenate([r["EMBEDDING"] for r in results]), mobile(images))


def test_every_baseline_exits_0_on_sigterm_and_leaves_no_process_behind(baselines):
    trees = {name: descendants(b.process.pid) for name, b in baselines.items()}
    for workload in WIDTH:  # the tree really holds the server this test means to see gone
        assert any("tritonserver" in cmd for cmd in trees[f"pytriton-{workload}"].values()), trees
    for baseline in baselines.values():
        baseline.process.send_signal(signal.SIGTERM)
    codes = {}
    for name, baseline in baselines.items():
        try:
            codes[name] = baseline.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            codes[name] = "still running"
    assert codes == dict.fromkeys(baselines, 0), codes
    deadline = time.monotonic() + 15  # orphaned helpers notice their closed pipes within moments
    while (left := {name: alive(tree) for name, tree in trees.items() if alive(tree)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left
    grpc_ports = [str(b.grpc_port) for b in baselines.values() if b.grpc_port]
    assert not [cmd for cmd in all_processes().values()
                if "tritonserver" in cmd and any(f"grpc-port={port}" in cmd for port in grpc_ports)]


def text_tensor(*texts: str) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=object)


# Processes, read from /proc: (pid, start time) identifies a process even if its pid is reused later.

def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def all_processes() -> dict[tuple[int, int], str]:
    return {(pid, stat[2]): _cmdline(pid) for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if (stat := _stat(pid)) is not None}


def descendants(root: int) -> dict[tuple[int, int], str]:
    """Every process below ``root``, keyed by (pid, start time), with its command line."""
    children: dict[int, list[int]] = {}
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        if (stat := _stat(pid)) is not None:
            children.setdefault(stat[0], []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if (stat := _stat(pid)) is not None:
            found[(pid, stat[2])] = _cmdline(pid)
            todo += children.get(pid, [])
    return found


def alive(tree: dict[tuple[int, int], str]) -> list[str]:
    """The processes of ``tree`` still running (zombies count as gone: only their exit status is left)."""
    return [cmd for (pid, started), cmd in tree.items()
            if (stat := _stat(pid)) is not None and stat[2] == started and stat[1] != "Z"]
