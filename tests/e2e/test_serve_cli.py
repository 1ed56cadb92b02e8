"""`toolkit serve` as a user runs it: a real process, real signals, a model that fails to load."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bounded import Background, read_until
from projects import python_model, write_model
from serving import free_port_run, free_ports

from toolkit.errors import ModelLoadError, ServerError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer

#: The slowest test took 17 s (teardown included) on a busy 2-core VM; `toolkit serve` gets 120 s for
#: its banner (start_serve), so that deadline, with its message, comes first.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
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


def test_a_server_without_python_models_does_not_hold_the_launch_lock_for_a_minute(tmp_path):
    """The python backend makes its /tmp/python_env_* folder when a python model loads; a server with
    none used to hold every launch's lock for the whole 60 s wait for a folder that never came."""
    (tmp_path / "repo").mkdir()
    http, grpc, metrics = free_ports(3)
    server = TritonServer(tmp_path / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=tmp_path / "triton.log")
    started = time.monotonic()
    try:
        server.start()
        took = time.monotonic() - started
    finally:
        server.stop()
    assert took < 45, f"start of an empty repository took {took:.0f}s (the lock's wait is 60 s)"
    assert not server._python_envs


def test_serve_exits_non_zero_naming_the_model_that_failed_to_load(tmp_path):
    repo = repository(tmp_path, broken=True)
    done = subprocess.run([*TOOLKIT, *serve_args(repo)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 1
    assert "1 model(s) failed to load" in done.stderr and "broken: " in done.stderr
    assert "weights.bin is missing" in done.stderr and "Traceback (most recent" not in done.stderr


def test_serve_prints_endpoints_and_stops_cleanly_on_sigterm(tmp_path):
    repo = repository(tmp_path, broken=False)
    args = serve_args(repo)
    process, lines = start_serve(args)
    try:
        assert "Triton is ready with echo" in "".join(lines)
        assert f"http://127.0.0.1:{args[4]}/v2" in "".join(lines)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == 0
    assert "tritonserver stopped (exit code 0)" in err
    leftovers = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True, timeout=10).stdout.split()
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


def start_serve(args: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """`toolkit serve` in the background, read until its banner ends (or it exits), at most 120 s;
    (process, banner lines)."""
    process = subprocess.Popen([*TOOLKIT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        return process, read_until(process, "Press Ctrl-C", 120)
    except BaseException:
        process.kill()
        process.communicate(timeout=30)
        raise


def test_serve_heals_a_killed_stub_and_says_so_then_exits_non_zero_after_an_unclean_stop(tmp_path):
    repo = repository(tmp_path, broken=False)
    args = serve_args(repo)
    process, banner = start_serve(args)
    try:
        assert "self-healing stubs: on" in "".join(banner)
        stubs = subprocess.run(["pgrep", "-f", f"triton_python_backend_stub {repo}/echo/"], capture_output=True,
                               text=True, timeout=10).stdout.split()
        assert len(stubs) == 1
        os.kill(int(stubs[0]), signal.SIGKILL)
        from toolkit.client import TritonClient

        with TritonClient(f"127.0.0.1:{args[6]}", protocol="grpc") as client:  # retries while it heals
            assert client.infer("echo", {"X": np.array([[3.0]], np.float32)})["Y"].tolist() == [[3.0]]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert "Traceback" not in err
    if "tritonserver serving again" in err:   # the stub took tritonserver down; it was started again
        assert "watchdog: tritonserver died" in err and process.returncode == 0, err
        return
    assert "watchdog: stub 'echo_0_0'" in err and "model 'echo' serving again" in err, err
    if process.returncode == 0:   # tritonserver let go of the crashed stub's version and exited 0
        assert "tritonserver stopped (exit code 0)" in err, err
        return
    # Triton may hang at exit on the crashed stub's old model version; the toolkit kills it once the
    # drain is done and says so with a non-zero status, never a silent 0.
    assert process.returncode == 1, err
    assert "Error: tritonserver drained, then hung on the model version of crashed stub(s) echo_0_0" in err


def test_serve_keeps_tritons_log_out_of_the_terminal(tmp_path):
    repo = repository(tmp_path, broken=False)
    args = [a for a in serve_args(repo)]
    args = args[:args.index("--log-file")]  # the default: tritonserver.log beside the repository
    process, banner = start_serve(args)
    try:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    everything = "".join(banner) + out + err
    assert process.returncode == 0, everything
    for noise in ("CudaDriverHelper", "CUDA driver version", "NVML", "model_lifecycle.cc"):
        assert noise not in everything
    assert f"log      {repo.parent / 'tritonserver.log'}" in everything
    assert "NVML" in (repo.parent / "tritonserver.log").read_text()


def test_serve_banner_lists_only_the_models_it_loaded(tmp_path):
    write_model(tmp_path, "other", python_model([("X", "FP32", [1])], [("Y", "FP32", [1])],
                                                parameters={"outputs": "Y"}))
    repo = repository(tmp_path, broken=False)
    process, banner = start_serve([*serve_args(repo), "--load-model", "echo"])
    try:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert "Triton is ready with echo\n" in banner


@pytest.mark.parametrize(("extra", "message"), [
    (["--load-model", "nosuch"], "Error: --load-model: no model 'nosuch' in"),
    (["--model-control", "none", "--load-model", "echo"], "Error: --load-model needs --model-control explicit"),
])
def test_serve_refuses_a_wrong_load_model_before_starting(tmp_path, extra, message):
    repo = repository(tmp_path, broken=False)
    done = subprocess.run([*TOOLKIT, *serve_args(repo), *extra], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1  # one clear line, no 400-line usage dump


def test_serve_on_a_spec_folder_says_to_run_gen_repo(tmp_path):
    repository(tmp_path, broken=False)
    done = subprocess.run([*TOOLKIT, "serve", "--repository", str(tmp_path / "models")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1
    assert "holds model specs (model.yaml), not a Triton repository: run `toolkit gen-repo" in done.stderr


def test_serve_replicas_prints_the_address_list_and_stops_cleanly(tmp_path):
    repo = repository(tmp_path, broken=False)
    base = free_port_run(6)
    process, banner = start_serve(["serve", "--repository", str(repo), "--replicas", "2", "--http-port", str(base)])
    try:
        text = "".join(banner)
        assert "2 Triton replicas are ready with echo" in text, text
        assert f"gRPC addresses (balanced by gRPC): 127.0.0.1:{base + 1},127.0.0.1:{base + 4}" in text
        from toolkit.client import TritonClient

        with TritonClient(f"127.0.0.1:{base + 1},127.0.0.1:{base + 4}", protocol="grpc") as client:
            assert client.infer("echo", {"X": np.array([[5.0]], np.float32)})["Y"].tolist() == [[5.0]]
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err
    assert "2 tritonservers stopped" in err


def test_serve_refuses_zero_replicas(tmp_path):
    repo = repository(tmp_path, broken=False)
    done = subprocess.run([*TOOLKIT, "serve", "--repository", str(repo), "--replicas", "0"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "Error: --replicas must be at least 1, got 0" in done.stderr


def test_serve_starts_over_the_leftovers_of_a_killed_rollout_and_removes_them(tmp_path):
    """A rollout killed half-way leaves a candidate model (whose config Triton would try to load)
    and staging folders; the next start removes them under the repository lock and serves."""
    import shutil

    from toolkit.files import RepositoryLock, leftovers

    repo = repository(tmp_path, broken=False)
    candidate = repo / "echo__candidate"
    shutil.copytree(repo / "echo", candidate)
    (candidate / "config.pbtxt").write_text('name: "echo__candidate"\nbackend: "python"\nthis is not pbtxt\n')
    (repo / ".echo.v2.partial-x1y2").mkdir()
    (repo / "echo" / ".2.partial-abcd").mkdir()
    assert len(leftovers(repo)) == 3
    events: list[str] = []
    http, grpc, metrics = free_ports(3)
    with TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log_file=tmp_path / "t.log",
                      on_event=events.append) as server:
        assert server.ready_models() == ["echo"]
    assert leftovers(repo) == []
    assert any("echo__candidate" in e and ".echo.v2.partial-x1y2" in e for e in events), events
    assert not RepositoryLock(repo).path.read_text()  # released: no holder recorded


@pytest.mark.timeout(300)   # 11 s measured; its own waits (banner 120, stop 90 + 30) come first
def test_serve_replicas_says_as_each_replica_is_ready_not_only_when_all_are(tmp_path):
    """Issue 21: `serve --replicas 3` was silent for 51 s until all three were ready. Each replica's
    "ready" line must come while the later ones are still down (their HTTP port not yet ready)."""
    import threading
    import urllib.request

    def ready(port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    repo = repository(tmp_path, broken=False)
    base = free_port_run(9)
    process = subprocess.Popen([*TOOLKIT, "serve", "--repository", str(repo), "--replicas", "3",
                                "--http-port", str(base)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress: list[tuple[str, bool]] = []   # (stderr line, replica 2 ready when it came)
    all_ready = threading.Event()

    def read_stderr() -> None:
        for line in process.stderr:
            progress.append((line.rstrip(), ready(base + 6)))
            if "(3 of 3 ready)" in line:
                all_ready.set()

    # the reader ends when serve closes its stderr: at its exit, which the finally below makes sure of
    with Background(seconds=240, join_timeout=10, name="serve") as stderr:
        stderr.once(read_stderr)
        try:
            read_until(process, "Press Ctrl-C", 120)
            assert process.poll() is None, progress
            assert stderr.until(all_ready.is_set, 30), progress   # printed before the banner; the reader may lag
            ready_lines = [(text, later_up) for text, later_up in progress if ": ready after " in text]
            assert [re.search(r"replica (\d): ready after [\d.]+s \((\d) of 3 ready\)", text).groups()
                    for text, _ in ready_lines] == [("0", "1"), ("1", "2"), ("2", "3")], progress
            assert ready_lines[0][1] is False, progress  # said while replica 2 was still down
            assert any("replica 0: starting (1 of 3" in text for text, _ in progress), progress
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=90)
        finally:
            if process.poll() is None:   # a failed assertion: stop it cleanly first, or its stubs' folders stay
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=90)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=30)
    assert process.returncode == 0, progress
