"""Helpers for tests that talk to a running tritonserver."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from toolkit.client import TritonClient
from toolkit.errors import InferenceError
from toolkit.server import free_ports

__all__ = ["call_concurrently", "free_ports"]


def call_concurrently(url: str, model: str, requests: list[dict[str, Any]], protocol: str = "grpc") -> list:
    """Send every request at once (one client and thread each, released together).

    Returns, in order, each request's outputs or the ``InferenceError`` it got.
    """
    barrier = threading.Barrier(len(requests))

    def one(inputs):
        with TritonClient(url, protocol=protocol) as client:
            barrier.wait()
            try:
                return client.infer(model, inputs)
            except InferenceError as e:
                return e

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(one, requests))
