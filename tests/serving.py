"""Helpers for tests that talk to a running tritonserver."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from onnx_models import write_linear_onnx

from toolkit.client import TritonClient
from toolkit.errors import InferenceError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import free_ports

__all__ = ["build_project", "call_concurrently", "example_repository", "free_port_run", "free_ports",
           "infer_outcome", "raw_http_infer"]

PROJECT = Path(__file__).parent / "e2e" / "project"
ROOT = Path(__file__).parents[1]


def build_project(root: Path) -> Path:
    """Copy the test project and build its ONNX model; returns the generated repository."""
    shutil.copytree(PROJECT, root / "project")
    write_linear_onnx(root / "project" / "models" / "linear" / "1" / "model.onnx")
    project = load_project(root / "project" / "models", root / "project" / "ensembles")
    return generate_repository(project, root / "repository").path



def example_repository(root: Path, minilm_export: Path, mobilenet_export: Path) -> Path:
    """The project's own `model_repository/` + `ensembles/` (embedding, mobile), generated under
    ``root`` with freshly exported ONNX files in place of any local exports."""
    shutil.copytree(ROOT / "model_repository", root / "models", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", root / "ensembles")
    shutil.copytree(minilm_export, root / "models" / "bert" / "1")
    shutil.copytree(mobilenet_export, root / "models" / "mobilenet" / "1")
    return generate_repository(load_project(root / "models", root / "ensembles"), root / "repo").path


def call_concurrently(url: str, model: str, requests: list[dict[str, Any]], protocol: str = "grpc") -> list:
    """Send every request at once (one client and thread each, released together).

    Returns, in order, each request's outputs or the ``InferenceError`` it got. Bounded: a thread
    that cannot make its client breaks the barrier for the others, and each call has the client's
    60 s timeout.
    """
    barrier = threading.Barrier(len(requests))

    def one(inputs):
        try:
            client = TritonClient(url, protocol=protocol)
        except BaseException:
            barrier.abort()
            raise
        with client:
            barrier.wait(timeout=60)
            try:
                return client.infer(model, inputs)
            except InferenceError as e:
                return e

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))


def free_port_run(count: int) -> int:
    """A base port with ``count`` consecutive free ports from it (for `--replicas`, which uses
    base + 3 i .. base + 3 i + 2)."""
    import socket

    def bindable(port: int) -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
                return True
            except OSError:
                return False

    for _ in range(50):
        base = free_ports(1)[0]
        if base + count < 65000 and all(bindable(p) for p in range(base, base + count)):
            return base
    raise AssertionError(f"no run of {count} free ports")


_DATATYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}


def raw_http_infer(url: str, model: str, tensors: dict[str, np.ndarray],
                   parameters: dict[str, Any] | None = None) -> tuple[int, str]:
    """Triton's own HTTP status and body for an infer request (no client library between)."""
    body: dict[str, Any] = {"inputs": [{"name": k, "shape": list(v.shape), "datatype": _DATATYPES[v.dtype],
                                        "data": v.ravel().tolist()} for k, v in tensors.items()]}
    if parameters:
        body["parameters"] = parameters
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer", data=json.dumps(body).encode(),
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def infer_outcome(client: TritonClient, model: str, inputs: dict[str, Any]) -> str:
    """One call as a load loop counts it: "answered", or "failed <code>"."""
    try:
        client.infer(model, inputs)
        return "answered"
    except InferenceError as e:
        return f"failed {e.code}"
