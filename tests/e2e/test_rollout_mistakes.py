"""An operator's mistakes in a rollout, as typed on the command line against a real server (issue 21):
a truncated ONNX file, a corrupt golden.npz, a version whose hook fails to load, and a server that
restricts its repository API. Each is one `Error:` line naming what is wrong, exit 1, printed before
"Rolling out ..." when nothing needed loading, and the served version keeps serving."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from onnx_models import LINEAR_B, LINEAR_W, write_linear_onnx
from projects import python_model, write_model
from serving import free_ports

from toolkit.client import TritonClient
from toolkit.lifecycle.golden import GOLDEN_FILE, write_golden
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import ApiRestriction, TritonServer

pytestmark = [pytest.mark.e2e]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
HEADER = "admin-key=s3cret-Value"
X = np.array([[1.0, 2.0, 3.0, 4.0]], np.float32)
FAILING_HOOK = '''
from toolkit.hooks import Hook


class Passthrough(Hook):
    def init(self, ctx):
        raise ValueError("this version cannot start")

    def infer(self, batch):
        return {"Y": batch["X"]}
'''


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`linear` (ONNX) and `echo` (a python hook) serving version 1, on a server started with
    --restrict-apis; later versions sit in the sources, each with one mistake."""
    root = tmp_path_factory.mktemp("rollout_mistakes")
    write_model(root, "linear", {"kind": "onnx", "max_batch_size": 8})
    write_linear_onnx(root / "models" / "linear" / "1" / "model.onnx")
    write_model(root, "echo", python_model([("X", "FP32", [4])], [("Y", "FP32", [4])]))
    repository = generate_repository(load_project(root / "models"), root / "repo").path
    good = (root / "models" / "linear" / "1" / "model.onnx").read_bytes()
    for version, onnx_bytes, golden in [(2, good[: len(good) // 2], True), (3, good, False), (4, good, True)]:
        folder = root / "models" / "linear" / str(version)
        folder.mkdir()
        (folder / "model.onnx").write_bytes(onnx_bytes)
        write_golden(folder / GOLDEN_FILE, {"x": X}, {"y": X @ LINEAR_W + LINEAR_B}, 1e-5, 1e-5)
        if not golden:  # a copy cut short: the zip's directory at its end is gone
            (folder / GOLDEN_FILE).write_bytes((folder / GOLDEN_FILE).read_bytes()[:100])
    failing = root / "models" / "echo" / "2"
    failing.mkdir()
    (failing / "hook.py").write_text(FAILING_HOOK)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log", restrict_apis=ApiRestriction.parse(HEADER)) as server:
        yield root, server


def rollout(served, *args: str) -> subprocess.CompletedProcess:
    root, server = served
    return subprocess.run([*TOOLKIT, "rollout", *args, "--models", str(root / "models"), "--url", server.http_url,
                           "--repository", str(server.repository)], capture_output=True, text=True, timeout=180)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "At:" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and len(lines) == 1 + sum("Rolling out" in line for line in lines), result.stderr
    return errors[0]


def linear_serves_version_1(server) -> None:
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        np.testing.assert_allclose(client.infer("linear", {"x": X})["y"], X @ LINEAR_W + LINEAR_B, rtol=1e-6)
    assert (server.repository / "linear" / "1").is_dir() and not (server.repository / "linear" / "2").exists()


def test_a_truncated_onnx_is_one_error_naming_the_file_before_anything_loads(served):
    root, server = served
    result = rollout(served, "linear", "--version", "2", "--admin-header", HEADER)
    error = one_error_line(result)
    path = root / "models" / "linear" / "2" / "model.onnx"
    assert error == (f"Error: {path}: not a readable ONNX model (Error parsing message with type 'onnx.ModelProto'; "
                     f"{path.stat().st_size} bytes): is it truncated? export it again"), error
    assert "Rolling out" not in result.stderr
    linear_serves_version_1(server)


def test_a_corrupt_golden_npz_is_one_error_naming_the_file_before_anything_loads(served):
    root, server = served
    result = rollout(served, "linear", "--version", "3", "--admin-header", HEADER)
    error = one_error_line(result)
    assert error.startswith(f"Error: {root / 'models' / 'linear' / '3' / GOLDEN_FILE}: not a readable golden file "
                            "(File is not a zip file): is it corrupt or truncated?"), error
    assert "Rolling out" not in result.stderr
    linear_serves_version_1(server)


def test_a_version_that_fails_to_load_is_one_line_after_rolling_out_and_version_1_serves(served):
    _, server = served
    result = rollout(served, "echo", "--version", "2", "--admin-header", HEADER, "--skip-golden-check")
    error = one_error_line(result)
    assert error.startswith("Error: version 2 of 'echo' failed to load (as 'echo__candidate'); "
                            "still serving 1: "), error
    assert "this version cannot start" in error
    assert result.stderr.startswith("Rolling out version 2 of 'echo' (loading the candidate, checking it) ...\n")
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        assert client.infer("echo", {"X": X})["Y"].tolist() == X.tolist()


@pytest.mark.parametrize(("header", "hint"), [
    (None, "pass the header `toolkit serve --restrict-apis` was given: --admin-header KEY=VALUE "
           "(or $TOOLKIT_RESTRICT_APIS)"),
    ("admin-key=wrong", "--admin-header is not the KEY=VALUE `toolkit serve --restrict-apis` was given"),
])
def test_rollout_without_the_admin_header_says_to_pass_it(served, header, hint):
    _, server = served
    result = rollout(served, "linear", "--version", "4", *(["--admin-header", header] if header else []))
    error = one_error_line(result)
    assert "403" in error or "restricted" in error, error
    assert error.endswith(f"the server restricts its repository API: {hint}"), error
    assert "Rolling out" not in result.stderr
    linear_serves_version_1(server)


def test_a_good_version_says_rolling_out_then_serves(served):
    _, server = served
    result = rollout(served, "linear", "--version", "4", "--admin-header", HEADER)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "Rolling out version 4 of 'linear' (loading the candidate, checking it) ...\n"
    assert "model 'linear' now serves version 4 (was 1); golden check passed" in result.stdout
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        np.testing.assert_allclose(client.infer("linear", {"x": X})["y"], X @ LINEAR_W + LINEAR_B, rtol=1e-6)
