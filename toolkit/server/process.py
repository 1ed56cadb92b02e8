"""Run a model repository on the real tritonserver bundled in the nvidia-pytriton wheel.

What it takes to run that binary well, done once here:
- a private backend folder of symlinks holding the python backend and the stub built for *this*
  interpreter (the wheel is never modified; the stub's relative rpath survives a symlink);
- an environment in which the stub finds this virtualenv's packages (its bin/ first on PATH, the
  toolkit's own source on PYTHONPATH) and Debian's libpython it links against;
- start-up that waits until Triton is live, then asks its repository index which models failed to
  load and why, so a broken model ends the start with its name and Triton's reason;
- explicit model control by default (every model loaded at start), so that the supervisor
  (``toolkit/server/supervisor.py``) can bring back a model whose python stub died, and a tritonserver
  that died, on its ports;
- no auto-complete (``--disable-auto-complete-config``): gen-repo writes complete configs, and the
  python backend's auto-complete stub, killed at the wrong moment, wedges a load for good;
- no ``/tmp/python_env_*`` folder left behind (the python backend makes one at every start, at a
  fixed place, and never removes it);
- an orderly stop: SIGTERM lets Triton finish in-flight requests before it exits, the server dies
  with its parent (PR_SET_PDEATHSIG) instead of outliving a crashed CLI or test run, no stub's
  ``/dev/shm`` region outlives it, and ``stop_problem`` says when the stop was not clean.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from toolkit.client.admin import TritonAdmin
from toolkit.errors import ModelLoadError, ServerError, TritonAdminError
from toolkit.files import RepositoryBusy, RepositoryLock, clean_leftovers
from toolkit.runtime.occupancy import remove_server_files
from toolkit.server.gpus import check_gpus
from toolkit.server.stubs import pids, remove_orphan_regions, stat_fields
from toolkit.server.supervisor import Supervisor, SupervisorPolicy

ModelControl = Literal["none", "poll", "explicit"]

#: Triton's own admin surfaces: loading/unloading models, shared memory, logging, tracing.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")


@dataclass(frozen=True)
class ApiRestriction:
    """Triton answers ``apis`` only to requests carrying the header ``key: value`` (HTTP) or the
    metadata ``triton-grpc-protocol-<key>: value`` (gRPC, as Triton names it); inference, health
    and metadata stay open. The value is on tritonserver's command line: treat the host as trusted."""

    key: str
    value: str
    apis: tuple[str, ...] = RESTRICTED_APIS

    @classmethod
    def parse(cls, text: str) -> ApiRestriction:
        """``KEY=VALUE`` (``toolkit serve --restrict-apis``)."""
        key, sep, value = text.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", key) or not re.fullmatch(r"[A-Za-z0-9._~+/-]+", value):
            raise ServerError("--restrict-apis: expected KEY=VALUE, KEY a lower-case header name "
                              "([a-z0-9_-]), VALUE of letters, digits and ._~+/-")
        return cls(key, value)

    def flags(self) -> list[str]:
        group = f"{','.join(self.apis)}:{self.key}={self.value}"
        return [f"--http-restricted-api={group}", f"--grpc-restricted-protocol={group}"]

    def http_headers(self) -> dict[str, str]:
        return {self.key: self.value}

    def grpc_headers(self) -> dict[str, str]:
        return {f"triton-grpc-protocol-{self.key}": self.value}


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports the OS reports free right now (for tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def bundled_server_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError("nvidia-pytriton is not installed: `pip install nvidia-pytriton==0.7.0`")
    path = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (path / "bin" / "tritonserver").is_file():
        raise ServerError(f"no tritonserver binary in {path}")
    return path


#: Thread-count variables of the BLAS / OpenMP libraries numpy and hooks may load.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def python_library_dir() -> str | None:
    """This interpreter's own libpython folder, when it has one (pyenv, python.org builds).

    The stub links ``libpython3.X.so.1.0``; from Debian's package it is another patch release than
    the interpreter whose standard library the stub then imports (3.11.2 vs 3.11.7 here), which
    breaks code that relies on the newer one (multiprocessing's RLock, pytriton issue #51).
    """
    libdir = sysconfig.get_config_var("LIBDIR")
    name = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and (Path(libdir) / name).exists():
        return str(libdir)
    return None


def stub_environment(base: dict[str, str]) -> dict[str, str]:
    """The environment in which the stub finds this interpreter's packages and libpython.

    Each model instance is one worker (go-infer's MaxWorkers), so numpy's BLAS gets one thread per
    stub unless the caller's environment says otherwise: OpenBLAS's pool otherwise spins for
    milliseconds after every small call and steals the cores the other instances need.
    """
    env = dict(base)
    for name in BLAS_THREAD_VARIABLES:
        env.setdefault(name, "1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding toolkit/
    env["PYTHONPATH"] = os.pathsep.join(p for p in [package_root, env.get("PYTHONPATH", "")] if p)
    libdir = python_library_dir()
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [libdir, env.get("LD_LIBRARY_PATH", "")] if p)
    return env


def prepare_backends(bundle: Path, into: Path) -> Path:
    """A backend folder whose python backend uses the stub matching this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"the bundled tritonserver has no python stub for Python {version}")
    missing = _missing_libraries(stub, stub_environment(dict(os.environ)))
    if missing:
        raise ServerError(f"the python stub needs {', '.join(missing)}; on Debian/Ubuntu install it with "
                          f"`apt-get install libpython{version}`")
    python_dir = into / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for item in (bundle / "backends" / "python").iterdir():
        if item.name != "__pycache__":
            (python_dir / item.name).symlink_to(item)
    (python_dir / stub.name).symlink_to(stub)
    return into


def _missing_libraries(binary: Path, env: dict[str, str]) -> list[str]:
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30, env=env).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []  # no ldd: let the server report it
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _wait_group_gone(pgid: int, within: float) -> None:
    """Until no live process of the group is left (zombies, whose maps are empty, count as gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        groups = (stat_fields(pid) for pid in pids())
        if not any(f is not None and int(f[2]) == pgid and f[0] != "Z" for f in groups):
            return
        time.sleep(0.05)


def _launch_lock() -> int | None:
    """An flock held from a tritonserver launch until its python_env folder appeared (see
    ``TritonServer._claim_python_envs``); None when it cannot be had within 90 s."""
    import fcntl

    with contextlib.suppress(OSError):
        fd = os.open(Path(tempfile.gettempdir()) / "toolkit-tritonserver-launch.lock", os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + 90
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return None
                time.sleep(0.05)
    return None


PYTHON_ENV_GLOB = "python_env_*"


def _python_envs() -> list[Path]:
    """The python backend's environment folders (``/tmp/python_env_XXXXXX``: a fixed place, not $TMPDIR)."""
    with contextlib.suppress(OSError):
        return [p for p in Path("/tmp").glob(PYTHON_ENV_GLOB) if p.is_dir()]
    return []


def check_repository(repository: Path, *, model_control: ModelControl = "explicit",
                     load_models: Sequence[str] = ()) -> list[str]:
    """The models a server started this way would load; every mistake a user can make in choosing the
    repository or the models is a ``ServerError`` naming it, before any process starts."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ServerError(f"model repository not found: {repository} (generate it with "
                          f"`toolkit gen-repo --out {repository}`)")
    models = sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").is_file())
    if not models:
        specs = sorted(d.name for d in repository.iterdir() if (d / "model.yaml").is_file())
        if specs:
            raise ServerError(f"{repository} holds model specs (model.yaml), not a Triton repository: run "
                              f"`toolkit gen-repo --models {repository} --out build/model_repository` and serve "
                              "build/model_repository")
    if load_models and model_control != "explicit":
        raise ServerError(f"--load-model needs --model-control explicit (got {model_control})")
    unknown = sorted(set(load_models) - set(models))
    if unknown:
        raise ServerError(f"--load-model: no model {', '.join(map(repr, unknown))} in {repository} "
                          f"(it has {', '.join(models) or 'none'})")
    chosen = sorted(load_models) if load_models else models
    check_gpus(repository, chosen)  # a GPU spec on a machine without one: refused here, never a CPU fall-back
    return chosen


class TritonServer:
    """One tritonserver process serving a repository. Use as a context manager or start()/stop()."""

    def __init__(self, repository: Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, model_control: ModelControl = "explicit",
                 load_models: Sequence[str] = (), log_verbose: int = 0, log_file: Path | None = None,
                 exit_timeout: int = 30, extra_args: Sequence[str] = (),
                 restrict_apis: ApiRestriction | None = None, self_heal: bool = True,
                 restart_on_crash: bool = True, on_event: Callable[[str], None] | None = None,
                 supervision: SupervisorPolicy | None = None):
        self.repository = Path(repository).absolute()
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.model_control, self.load_models = model_control, list(load_models)
        self.log_verbose, self.log_file, self.exit_timeout = log_verbose, log_file, exit_timeout
        self.extra_args = list(extra_args)
        self.restrict_apis = restrict_apis
        #: Reload a model whose python stub died (needs explicit model control: the repository API).
        self.self_heal = self_heal and model_control == "explicit"
        #: Start tritonserver again on its ports when it dies on its own.
        self.restart_on_crash = restart_on_crash and self_heal
        self.supervision = supervision or SupervisorPolicy()
        self._output: IO | int | None = None
        self.on_event = on_event
        #: The supervisor of this server and its stubs while it runs (``toolkit/server/supervisor.py``).
        self.watchdog: Supervisor | None = None
        self._python_envs: set[Path] = set()   # the python backend's /tmp/python_env_* of our launches
        #: Why the last ``stop`` was not clean (Triton failed to drain, or had to be killed), or None.
        self.stop_problem: str | None = None
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        # stop() against the watchdog's restart of a crashed server: a restart either launches
        # before stop() looks at the process (and stop() then stops it), or not at all.
        self._stopping = threading.Event()
        self._launching = threading.Lock()
        self._launched_at: float | None = None  # time.time() of the first launch: stop() sweeps after it
        self._log: IO | None = None

    @property
    def client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    @property
    def http_url(self) -> str:
        return f"{self.client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.client_host}:{self.metrics_port}/metrics"

    def command(self, backend_dir: Path) -> list[str]:
        cmd = [str(bundled_server_dir() / "bin" / "tritonserver"),
               f"--model-repository={self.repository}", f"--backend-directory={backend_dir}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}",
               f"--model-control-mode={self.model_control}", "--exit-on-error=false",
               "--disable-auto-complete-config",
               f"--exit-timeout-secs={self.exit_timeout}", f"--log-verbose={self.log_verbose}"]
        if self.model_control == "explicit":
            cmd += [f"--load-model={m}" for m in self.load_models or ["*"]]
        if self.restrict_apis is not None:
            cmd += self.restrict_apis.flags()
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        return stub_environment(dict(os.environ))

    def _check_ports_free(self) -> None:
        """Another server on our ports would answer our readiness checks as if it were ours."""
        busy = []
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            with socket.socket() as probe:
                # As servers do: closed connections in TIME_WAIT must not count, only a listener.
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((self.host, port))
                except OSError:
                    busy.append(port)
        if busy:
            raise ServerError(f"port(s) {', '.join(map(str, busy))} on {self.host} already in use "
                              "(another tritonserver?); choose other ports")

    def start(self, timeout: float = 180.0) -> TritonServer:
        if not self.repository.is_dir():
            raise ServerError(f"model repository not found: {self.repository}")
        self._check_ports_free()
        self._clean_leftovers()
        self._stopping.clear()
        bundle = bundled_server_dir()
        self._workdir = Path(tempfile.mkdtemp(prefix="toolkit-triton-"))
        prepare_backends(bundle, self._workdir / "backends")
        output: IO | int | None = None
        if self.log_file is not None:
            self._log = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
            output = self._log
        self._output = output
        self.process = self._launch()
        self._claim_python_envs()
        self.watchdog = Supervisor(self, policy=self.supervision, heal=self.self_heal, log=self._event,
                                   restart_server=self.restart_on_crash)
        try:
            self._wait_until_ready(timeout)
            self.watchdog.start()
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def supervisor(self) -> Supervisor | None:
        return self.watchdog

    def _clean_leftovers(self) -> None:
        """Remove what a rollout or a write that died half-way left in the repository (a candidate
        model, staging folders), which Triton would otherwise try to load. Under the repository lock:
        a rollout in progress (on another replica's server) keeps its files, and this start skips it."""
        try:
            with RepositoryLock(self.repository).hold("start of tritonserver", wait=5.0):
                removed = clean_leftovers(self.repository)
        except RepositoryBusy as e:
            self._event(f"server: leftovers not cleaned: {e}")
            return
        if removed:
            self._event(f"server: removed what an operation that died left: {', '.join(p.name for p in removed)}")

    def _launch(self) -> subprocess.Popen:
        self._launched_at = time.time() if self._launched_at is None else self._launched_at
        assert self._workdir is not None
        self._python_env_lock = _launch_lock()
        self._python_envs_before = set(_python_envs())
        # The server dies with the process that started it. util-linux's setpriv sets that up without
        # running Python between fork and exec (a preexec_fn can crash the child of a process whose
        # gRPC threads are busy, as a gateway's or a test's are).
        setpriv = shutil.which("setpriv")
        prefix = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        return subprocess.Popen(
            prefix + self.command(self._workdir / "backends"), env=self.environment(), stdout=self._output,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=None if setpriv else _die_with_parent)

    def _claim_python_envs(self) -> None:
        """Attribute the python backend's ``/tmp/python_env_*`` of the launch just made to this server.

        The backend makes one at every start (at a fixed path, not $TMPDIR) and removes it itself on a
        clean exit, aborting that exit if it is gone: so only our own may ever be removed, and only
        once our server is dead. Launches of the toolkit's servers (any process) therefore hold a file
        lock until their folder has appeared, which makes "the new one" exactly ours."""
        before = getattr(self, "_python_envs_before", None)
        lock_fd = getattr(self, "_python_env_lock", None)
        try:
            deadline = time.monotonic() + 60
            next_probe = time.monotonic() + 0.5
            while before is not None and time.monotonic() < deadline:
                new = set(_python_envs()) - before
                if new or self.process is None or self.process.poll() is not None:
                    self._python_envs |= new
                    break
                if time.monotonic() >= next_probe:  # loaded everything and made none: no python model
                    if self._started_without_python_env():
                        break
                    next_probe = time.monotonic() + 0.5
                time.sleep(0.05)
        finally:
            self._python_envs_before = None
            if lock_fd is not None:
                os.close(lock_fd)   # releases the flock
                self._python_env_lock = None

    def _started_without_python_env(self) -> bool:
        """The server is live and loads nothing any more, yet no python_env appeared: it has no
        python model (the backend makes its folder when the first one loads)."""
        if self.http("GET", "/v2/health/live")[0] != 200:
            return False
        try:
            return not any(m.get("state") == "LOADING" for m in self.admin.index())
        except TritonAdminError:  # not answering yet: keep waiting
            return False

    def _remove_python_envs(self) -> None:
        """Remove this server's python_env folder once it is dead (an unclean exit leaves it)."""
        if self.process is not None and self.process.poll() is None:
            return
        for path in self._python_envs:
            with contextlib.suppress(OSError):
                path.rmdir()   # only ever an empty one
        self._python_envs = set()

    def _kill_group(self) -> None:
        """SIGKILL tritonserver and its stubs (a wedged or dead server, before a restart)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
            # Its stubs die with it, but a dying stub still maps its shared memory region: a stop
            # sweeping regions while they linger would leave theirs behind (seen on a busy machine).
            _wait_group_gone(self.process.pid, within=10.0)

    def _relaunch(self, timeout: float = 180.0) -> None:
        """Start tritonserver again on its ports after it died or was killed (the supervisor's one
        restart path). Its stubs go first; a stop() meanwhile wins."""
        old = self.process
        assert old is not None
        self._kill_group()
        remove_server_files(old.pid)
        self._remove_python_envs()
        deadline = time.monotonic() + 30
        while True:  # the dead server's listening sockets close with it; give the kernel a moment
            if self._stopping.is_set():
                raise ServerError("the server is stopping: not started again")
            try:
                self._check_ports_free()
                break
            except ServerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with self._launching:
            if self._stopping.is_set():
                raise ServerError("the server is stopping: not started again")
            self.process = self._launch()
            self._claim_python_envs()
        self._wait_until_ready(timeout)

    def _event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    @property
    def admin(self) -> TritonAdmin:
        """The admin client of this server (toolkit.client.admin), with the admin header when APIs
        are restricted."""
        headers = self.restrict_apis.http_headers() if self.restrict_apis else {}
        return TritonAdmin(self.http_url, headers)

    def http(self, method: str, path: str, body: bytes | None = None, *, timeout: float = 5) -> tuple[int, bytes]:
        """One request to Triton's HTTP endpoint through ``admin``; ``(0, b"")`` when it cannot be reached."""
        return self.admin.request(method, path, body, timeout=timeout)

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            if self.http("GET", "/v2/health/live")[0] == 200:
                break
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver did not come up within {timeout:.0f}s{self._log_hint()}")
            time.sleep(0.2)
        while True:
            self._check_alive()
            models = self.repository_index()
            if not any(m.get("state") == "LOADING" for m in models):
                break
            if time.monotonic() > deadline:
                raise ServerError(f"models still loading after {timeout:.0f}s{self._log_hint()}")
            time.sleep(0.2)
        failures = {m["name"]: m.get("reason") or "unavailable" for m in models
                    if m.get("state") not in ("READY", None) and self._expected(m["name"])}
        if failures:
            raise ModelLoadError(failures)
        while self.http("GET", "/v2/health/ready")[0] != 200:
            self._check_alive()
            if time.monotonic() > deadline:
                raise ServerError(f"tritonserver is live but not ready after {timeout:.0f}s{self._log_hint()}")
            time.sleep(0.2)

    def _expected(self, name: str) -> bool:
        return self.model_control != "explicit" or not self.load_models or name in self.load_models

    def ready_models(self) -> list[str]:
        """The models Triton serves right now (READY), by name."""
        return self.admin.ready_models()

    def repository_index(self) -> list[dict]:
        try:
            return self.admin.index()
        except TritonAdminError:
            return []

    def _check_alive(self) -> None:
        if self._stopping.is_set():
            raise ServerError("the server is stopping")
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise ServerError(f"tritonserver exited with code {code}{self._log_hint()}")

    def _log_hint(self) -> str:
        return f" (see its log: {self.log_file})" if self.log_file else ""

    def stop(self) -> int | None:
        """Ask Triton to drain and exit; force it when it cannot. Returns its exit code and sets
        ``stop_problem`` when the stop was not clean (a non-zero exit, or a kill). Stopping a
        stopped server changes nothing."""
        if self.process is not None and self.process.returncode is not None and self.watchdog is None \
                and self._workdir is None:
            return self.process.returncode
        code, self.stop_problem = None, None
        self._stopping.set()  # a restart in progress gives up waiting for readiness
        if self.watchdog is not None:
            self.watchdog.stop()
        with self._launching:  # a restart that launched has set self.process; none launches after
            pass
        if self.watchdog is not None and self.process is not None and self.process.poll() is None:
            self.watchdog.scan()  # the stubs of a server the watchdog has just started again
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            code = self._wait_for_exit()
        elif self.process is not None:
            code = self.process.returncode
        if self.process is not None:
            # Stubs of a tritonserver that died abruptly (e.g. signalled while loading) outlive it;
            # they share its process group (ours alone: start_new_session), so sweep the group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            _wait_group_gone(self.process.pid, within=10.0)   # a dying stub still maps its region
            remove_server_files(self.process.pid)  # the hooks' occupancy locks (runtime/occupancy.py)
            if code not in (0, None) and self.stop_problem is None:
                self.stop_problem = f"tritonserver exited with code {code}: it did not drain cleanly{self._log_hint()}"
        if self.watchdog is not None:
            # Regions of stubs that died with (or before) the server: Triton removes its own on a
            # clean exit, so only leftovers remain here.
            self.watchdog.remove_shm(list(self.watchdog.stubs.values()))
            self.watchdog = None
            # ... and those of stubs that died before any scan saw them (a crash during a heal, a
            # stop while a restarted server still loads), made since this server's first launch
            remove_orphan_regions(since=self._launched_at)
            self._launched_at = None
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        self._remove_python_envs()
        return code

    def _wait_for_exit(self) -> int:
        """Wait for the SIGTERMed server: up to ``exit_timeout`` + 10 s, or, when all that keeps it
        alive is a crashed stub's model version it can never unload (see ``toolkit/server/stubs.py``),
        until every live stub has finished (the drain is then complete) plus a short grace."""
        assert self.process is not None
        zombies = self.watchdog.leftover_zombies() if self.watchdog is not None else []
        deadline = time.monotonic() + self.exit_timeout + 10
        drained_at: float | None = None
        while time.monotonic() < deadline:
            try:
                return self.process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if zombies and self.watchdog is not None:
                if not self.watchdog.drained():
                    drained_at = None
                    continue
                drained_at = drained_at or time.monotonic()
                if time.monotonic() - drained_at > 2.0:
                    break
        os.killpg(self.process.pid, signal.SIGKILL)
        code = self.process.wait()
        if zombies:
            names = ", ".join(sorted(z.instance for z in zombies))
            self.stop_problem = (f"tritonserver drained, then hung on the model version of crashed stub(s) "
                                 f"{names} and was killed")
        else:
            self.stop_problem = f"tritonserver did not exit within {self.exit_timeout + 10}s and was killed"
        return code

    def wait(self) -> int | None:
        """Until the server ends for good: stopped, or dead and not restarted (no restart on crash,
        or the supervisor gave up). A crash the supervisor heals is not the end. Returns the last
        exit code (None while stopping a live one)."""
        assert self.process is not None
        while not self._stopping.is_set():
            supervisor = self.watchdog
            process = self.process
            if supervisor is None or not self.restart_on_crash:
                if process.poll() is not None:
                    return process.returncode
            elif supervisor.given_up.is_set():
                return process.poll()
            time.sleep(0.2)
        return self.process.poll()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
