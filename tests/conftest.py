"""Session-wide fixtures: real exports, made once per test run, and the real tritonservers that serve
the test project (`triton`) and the example's own repository (`example_server`) to every test that
does not disturb them. Tests that kill stubs or overload a server start their own
(`serving.example_repository` builds the example's)."""

from __future__ import annotations

import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from bounded import wait_for
from serving import build_project, example_repository, free_ports

from toolkit.server import TritonServer


@pytest.fixture(scope="session", autouse=True)
def no_python_env_outlives_the_suite():
    """Every tritonserver the suite starts is stopped, and with it the python backend's
    ``/tmp/python_env_*`` folder goes (issue 20: each start used to leave one behind)."""
    from toolkit.server.process import _python_envs

    before = set(_python_envs())
    yield
    left = sorted(str(p) for p in set(_python_envs()) - before)
    foreign = _foreign_tritonservers()
    if left and foreign:  # /tmp is shared: another checkout's suite or a user's server made these
        warnings.warn(f"python_env folders {left} left while tritonservers not started by this suite ran "
                      f"(pids {foreign}): not counted", stacklevel=1)
        return
    assert not left, f"python backend environment folders left behind by the suite: {left}"


def _foreign_tritonservers() -> list[int]:
    """tritonserver processes on this machine that this pytest process did not start."""
    from toolkit.server.stubs import pids, stat_fields

    def ours(pid: int) -> bool:
        for _ in range(64):
            fields = stat_fields(pid)
            if fields is None or pid <= 1:
                return False
            if pid == os.getpid():
                return True
            pid = int(fields[1])
        return False

    found = []
    for pid in pids():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != "tritonserver":
                    continue
        except OSError:
            continue
        if not ours(pid):
            found.append(pid)
    return found


TESTS = Path(__file__).parent


def _started_by_the_tests(thread: threading.Thread) -> bool:
    """Whether ``thread`` runs a function of a module under tests/ (a live thread keeps its target)."""
    module = sys.modules.get(getattr(getattr(thread, "_target", None), "__module__", None) or "")
    return Path(getattr(module, "__file__", None) or "/").is_relative_to(TESTS)


@pytest.fixture(autouse=True)
def no_test_thread_outlives_its_test():
    """A thread a test started has ended when the test ends, or that test fails here, by name, rather
    than the thread failing or warning in a later test it disturbs."""
    before = set(threading.enumerate())

    def left() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive() and _started_by_the_tests(t)
                and not getattr(t, "reported", False)]

    yield
    if left() and not wait_for(lambda: not left(), 5):
        raise AssertionError(f"thread(s) started by this test still running 5s after it ended: "
                             f"{[t.name for t in left()]}")


@pytest.fixture(scope="session")
def minilm_report(tmp_path_factory):
    """The packaged all-MiniLM-L6-v2 exported to ONNX (and checked against Keras): the ExportReport."""
    from toolkit.export import export_bert

    return export_bert(None, tmp_path_factory.mktemp("minilm") / "bert", 1)


@pytest.fixture(scope="session")
def minilm_export(minilm_report) -> Path:
    """The MiniLM export's version folder (model.onnx, vocab.txt, export.json)."""
    return minilm_report.version_dir


@pytest.fixture(scope="session")
def mobilenet_export(tmp_path_factory) -> Path:
    """MobileNetV2 (random weights, include_top=False, avg pooling) as the `mobile` service expects it."""
    from toolkit.export import export_keras

    out = tmp_path_factory.mktemp("mobilenet")
    export_keras("MobileNetV2", out, 1, include_top=False, pooling="avg", input_name="image",
                 output_name="embedding")
    return out / "1"


@dataclass
class Running:
    server: TritonServer
    repository: Path

    def url(self, protocol: str) -> str:
        return self.server.http_url if protocol == "http" else self.server.grpc_url


@pytest.fixture(scope="session")
def triton(tmp_path_factory) -> Running:
    root = tmp_path_factory.mktemp("triton")
    repository = build_project(root)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=root / "tritonserver.log")
    with server:
        yield Running(server, repository)


@pytest.fixture(scope="session")
def example_server(tmp_path_factory, minilm_export, mobilenet_export) -> TritonServer:
    """The example's repository on a real tritonserver, shared by the tests that do not disturb it."""
    root = tmp_path_factory.mktemp("example")
    repository = example_repository(root, minilm_export, mobilenet_export)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as server:
        yield server
