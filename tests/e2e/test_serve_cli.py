"""`toolkit serve` as a user runs it: a real process, real signals, a model that fails to load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from projects import python_model, write_model
from serving import free_ports

from toolkit.errors import ModelLoadError, ServerError
from toolkit.project import load_project
from toolkit.repo import generate_repository
from toolkit.server import TritonServer

pytestmark = pytest.mark.e2e
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]

BROKEN_HOOK = '''
from toolkit.hooks import Hook


class Broken(Hook):
    def init(self, ctx):
        raise FileNotFoundError("weights.bin is missing from " + ctx.model_dir.name)

    def infer(self, batch):
        return {}
'''


def repository(tmp_path: Path, broken: bool) -> Path:
    write_model(tmp_path, "echo", python_model([("X", "FP32", [1])], [("Y", "FP32", [1])],
                                               parameters={"outputs": "Y"}))
    if broken:
        write_model(tmp_path, "broken", python_model([("X", "FP32", [1])], [("Y", "FP32", [1])],
                                                     hook="hook:Broken"), files={"hook.py": BROKEN_HOOK})
    project = load_project(tmp_path / "models", tmp_path / "ensembles")
    return generate_repository(project, tmp_path / "repo").path


def serve_args(repo: Path) -> list[str]:
    http, grpc, metrics = free_ports(3)
    return ["serve", "--repository", str(repo), "--http-port", str(http), "--grpc-port", str(grpc),
            "--metrics-port", str(metrics), "--log-file", str(repo.parent / "triton.log")]


def test_server_start_raises_model_load_error_naming_model_and_reason(tmp_path):
    repo = repository(tmp_path, broken=True)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=tmp_path / "triton.log")
    with pytest.raises(ModelLoadError) as info:
        server.start()
    assert set(info.value.failures) == {"broken"}
    assert "weights.bin is missing from 1" in info.value.failures["broken"]
    assert server.process.poll() is not None  # the failed start does not leave a server behind


def test_serve_exits_non_zero_naming_the_model_that_failed_to_load(tmp_path):
    repo = repository(tmp_path, broken=True)
    done = subprocess.run([*TOOLKIT, *serve_args(repo)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert "1 model(s) failed to load" in done.stderr and "broken: " in done.stderr
    assert "weights.bin is missing" in done.stderr and "Traceback (most recent" not in done.stderr


def test_serve_prints_endpoints_and_stops_cleanly_on_sigterm(tmp_path):
    repo = repository(tmp_path, broken=False)
    args = serve_args(repo)
    process = subprocess.Popen([*TOOLKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            lines.append(line)
            if "Press Ctrl-C" in line or not line:
                break
        assert "Triton is ready with echo" in "".join(lines)
        assert f"http://127.0.0.1:{args[4]}/v2" in "".join(lines)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == 0
    assert "tritonserver stopped (exit code 0)" in err
    leftovers = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout.split()
    assert leftovers == [], "tritonserver or python stubs outlived `toolkit serve`"


def test_server_start_refuses_a_port_another_server_holds(tmp_path):
    import socket

    repo = repository(tmp_path, broken=False)
    http, grpc, metrics = free_ports(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", grpc))
        squatter.listen()
        server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics)
        with pytest.raises(ServerError, match=f"port\\(s\\) {grpc} on 127.0.0.1 already in use"):
            server.start()
    assert server.process is None
