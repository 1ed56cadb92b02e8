"""The benchmark's server processes: start one in its own process group, wait until it answers."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from toolkit.errors import BenchError


def wait_http(url: str, process: subprocess.Popen | None, timeout: float, what: str) -> None:
    """Until ``url`` answers 200; BenchError if ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what} exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise BenchError(f"{what} was not ready at {url} within {timeout:.0f}s")


@contextmanager
def process_group(cmd: list[str], log: Path) -> Iterator[subprocess.Popen]:
    """Run ``cmd`` in a session of its own (output to ``log``); end its whole group on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
