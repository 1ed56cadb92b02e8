"""A real `toolkit gateway` process for tests, and go-infer's signing as its clients do it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from serving import ROOT, free_ports

from toolkit.gateway.signing import canonical_string, sha256_signature, sm2_sign

TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
EXAMPLE_SETTINGS = yaml.safe_load((ROOT / "gateway.yaml").read_text())
(APP, SECRET), = EXAMPLE_SETTINGS["API"]["AppIdSecret"].items()
SM2_PRIVATE = EXAMPLE_SETTINGS["API"]["SM2PrivateKey"]


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log: Path
    settings: Path


def signed(data: dict, *, sign_type: str = "SHA256", app_id: str = APP, secret: str = SECRET, **extra) -> dict:
    body = {"appId": app_id, "version": "1", "signType": sign_type, "encType": "plain",
            "timestamp": int(time.time()), "data": data, **extra}
    text = canonical_string(body, secret)
    body["signData"] = sha256_signature(text) if sign_type == "SHA256" else sm2_sign(text, SM2_PRIVATE)
    return body


def wait_until_live(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"gateway exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url + "/", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise AssertionError(f"gateway not live after {timeout}s:\n{log.read_text()}")


@contextlib.contextmanager
def running_gateway(root: Path, triton: str, replace: tuple[str, ...] = (), **overrides: Any) -> Iterator[Gateway]:
    """The example's gateway.yaml with ``overrides`` merged into its sections (API, Triton, ...), or
    replacing the sections named in ``replace``."""
    settings = {section: dict(value) if isinstance(value, dict) else value
                for section, value in EXAMPLE_SETTINGS.items()}
    for section, values in overrides.items():
        merge = isinstance(values, dict) and section not in replace
        settings[section] = {**settings.get(section, {}), **values} if merge else values
    path = root / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    (port,) = free_ports(1)
    log = root / "gateway.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([*TOOLKIT, "gateway", "--settings", str(path), "--triton", triton,
                                    "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_live(url, process, log)
        yield Gateway(url, process, log, path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def call(gateway: Gateway, path: str, body: dict | bytes, timeout: float = 60) -> tuple[int, dict]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{gateway.url}/api/{path}", content=content, timeout=timeout)
    return response.status_code, response.json()
