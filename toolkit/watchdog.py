"""Self-healing python stubs: notice a stub that died and bring its model back, on a running server.

Triton's python backend (24.10) never restarts a stub that died (an OOM kill, a segfault in a native
library): every request routed to that instance then fails with ``Stub process '<instance>' is not
healthy`` for as long as the server runs, while the model and the server keep saying READY. What the
backend does do, and what this module builds on:

- a stub is a direct child of tritonserver whose command line names its model file, its shared-memory
  region and its instance (``triton_python_backend_stub <repo>/<model>/<version>/model.py <region>
  ... <instance>``);
- tritonserver reaps a stub only when it unloads the model, so a stub that died on its own stays a
  *zombie*: a zombie stub is a crash, a stub that vanished was unloaded on purpose;
- unloading and loading the model again through the repository API (explicit model control) starts
  fresh stubs; a model whose instances are all dead is unloaded first, so the model's and the
  server's readiness say "not ready" until it serves again; a model with live instances left is
  reloaded in place (a config override bumps ``toolkit.restarts``) and keeps serving meanwhile;
- the dead stub's ``/dev/shm`` region is removed by the watchdog once the stub is gone, since the
  backend cannot always do it (a request that failed on a dead stub keeps the old model version
  referenced forever: tritonserver then hangs on it at exit, which ``TritonServer.stop`` handles).

The watchdog is a thread of the process that started tritonserver (``toolkit serve``, or a test);
it scans ``/proc`` every ``interval`` seconds, which is the detection window.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolkit.server import TritonServer

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
#: Config parameter bumped by an in-place reload (Triton reloads only a model whose config changed).
RESTARTS_PARAMETER = "toolkit.restarts"
#: A zombie seen this long is a crash, not a stub between its exit and tritonserver's waitpid.
_ZOMBIE_GRACE = 0.15


@dataclass(frozen=True)
class Stub:
    """One python stub process of a running tritonserver."""

    pid: int
    model: str
    version: str
    instance: str
    shm_region: str

    @classmethod
    def from_argv(cls, pid: int, argv: list[str]) -> Stub | None:
        if len(argv) < 9 or not argv[0].endswith(STUB_BINARY):
            return None
        model_file = Path(argv[1])
        return cls(pid, model_file.parent.parent.name, model_file.parent.name, argv[8], argv[2])


def _children(parent: int) -> dict[int, tuple[str, list[str]]]:
    """pid -> (state letter, argv) of ``parent``'s children (argv is empty for a zombie)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        out[int(entry)] = (fields[0], argv)
    return out


REGION_PREFIX = "triton_python_backend_shm_region_"


def remove_orphan_regions(directory: Path = SHM_DIR, min_age: float = 10.0, since: float | None = None) -> list[str]:
    """Remove the python backend's shared memory regions that no process maps any more: what a
    server that died abruptly left, including regions of stubs it started so shortly before that no
    scan saw them. Only regions of this user that no process whose maps can be read maps, and either
    older than ``min_age`` seconds (a starting server creates and maps its own in one step) or made
    at or after ``since`` (the launch of a server that is gone now: a SIGTERM that arrives while
    tritonserver still loads its models kills it before it can remove the regions it made)."""
    now, uid = time.time(), os.getuid()
    candidates = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(REGION_PREFIX):
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    if info.st_uid == uid and (now - info.st_mtime >= min_age
                                               or (since is not None and info.st_ctime >= since)):
                        candidates[entry.path] = entry.name
    if not candidates:
        return []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue  # gone, or another user's (who could not map this user's 0600 region anyway)
        for path in [p for p in candidates if p in maps]:
            del candidates[path]
    removed = []
    for path, name in candidates.items():
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(name)
    return removed


@dataclass
class Heal:
    """One recovery, for the log and for tests: what died, what was done, how long it took."""

    model: str
    instances: list[str]
    detected: float
    action: str = ""               # "reload" (all instances dead) or "reload-in-place"
    serving_after: float | None = None   # seconds from detection until the model was READY again
    error: str | None = None
    attempts: int = 0


@dataclass
class _ModelState:
    dead: dict[int, Stub] = field(default_factory=dict)
    next_attempt: float = 0.0
    backoff: float = 1.0
    heal: Heal | None = None


class StubWatchdog:
    """Watches ``server``'s stubs and reloads a model whose stub died. ``heal=False`` only watches
    (records stubs and removes dead stubs' shared memory at stop), for servers whose model control
    mode has no repository API (none, poll)."""

    def __init__(self, server: TritonServer, *, interval: float = 0.1, heal: bool = True,
                 log: Callable[[str], None] | None = None, load_timeout: float = 120.0,
                 restart_server: bool = False):
        self.server, self.interval, self.heal_enabled = server, interval, heal
        self.restart_server = restart_server
        self.log = log or (lambda message: None)
        self.load_timeout = load_timeout
        self.stubs: dict[int, Stub] = {}          # every stub seen alive, by pid
        #: Stubs of model versions replaced after a crash: tritonserver may never finish unloading
        #: those versions (see the module docstring), so they do not count when judging a drain.
        self.stranded: set[int] = set()
        self.heals: list[Heal] = []
        self._zombie_since: dict[int, float] = {}
        self._handled: set[int] = set()
        self._models: dict[str, _ModelState] = {}
        self._restarts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> StubWatchdog:
        self.scan()
        self._thread = threading.Thread(target=self._run, name="toolkit-stub-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.load_timeout + 5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                process = self.server.process
                if self.restart_server and process is not None and process.poll() is not None:
                    self._restart_server(process.returncode)
                    continue
                self.scan()
                if self.heal_enabled:
                    self._heal_due()
            except Exception as e:  # the watchdog must outlive any surprise
                self.log(f"watchdog: {type(e).__name__}: {e}")

    # --- observing -------------------------------------------------------------------------------

    def scan(self) -> list[Stub]:
        """Record new stubs; return those that died since the last scan (and mark them)."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return []
        now = time.monotonic()
        children = _children(process.pid)
        died = []
        with self._lock:
            for pid, (state, argv) in children.items():
                if state != "Z" and pid not in self.stubs:
                    stub = Stub.from_argv(pid, argv)
                    if stub is not None:
                        self.stubs[pid] = stub
            for pid, stub in self.stubs.items():
                if pid in self._handled:
                    continue
                state = children.get(pid, ("gone", []))[0]
                if state != "Z":
                    self._zombie_since.pop(pid, None)
                    continue
                since = self._zombie_since.setdefault(pid, now)
                if now - since >= _ZOMBIE_GRACE or self.interval >= _ZOMBIE_GRACE:
                    self._handled.add(pid)
                    died.append(stub)
            for stub in died:
                state = self._models.setdefault(stub.model, _ModelState())
                state.dead[stub.pid] = stub
                state.next_attempt = min(state.next_attempt or now, now)
                if state.heal is None:
                    state.heal = Heal(stub.model, [], detected=now)
                state.heal.instances.append(stub.instance)
                self.log(f"watchdog: stub '{stub.instance}' (pid {stub.pid}) of model '{stub.model}' died")
        return died

    def alive(self, model: str) -> list[Stub]:
        """The live stubs of ``model`` right now."""
        process = self.server.process
        if process is None:
            return []
        children = _children(process.pid)
        with self._lock:
            return [s for pid, s in self.stubs.items()
                    if s.model == model and pid in children and children[pid][0] != "Z"]

    def leftover_zombies(self) -> list[Stub]:
        """Dead stubs tritonserver never reaped: it will hang on them at exit."""
        process = self.server.process
        if process is None or process.poll() is not None:
            return []
        children = _children(process.pid)
        with self._lock:
            return [s for pid, s in self.stubs.items() if children.get(pid, ("", []))[0] == "Z"]

    def drained(self) -> bool:
        """Every stub still running belongs to a version replaced after a crash: all other models
        have been unloaded, so a stopping tritonserver has nothing left to finish."""
        process = self.server.process
        if process is None:
            return True
        live = {pid for pid, (state, _) in _children(process.pid).items() if state != "Z"}
        with self._lock:
            return live <= self.stranded

    def shm_regions(self) -> list[str]:
        with self._lock:
            return sorted({s.shm_region for s in self.stubs.values()})

    def remove_shm(self, stubs: list[Stub]) -> None:
        for stub in stubs:
            if "/" not in stub.shm_region and stub.shm_region:
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    (SHM_DIR / stub.shm_region).unlink()

    # --- healing ---------------------------------------------------------------------------------

    def _restart_server(self, code: int | None) -> None:
        """tritonserver itself died: the python backend aborts it when a stub was killed while
        holding one of their shared locks (boost's lock_exception, uncaught). Start it again."""
        heal = Heal("tritonserver", [f"exit code {code}"], detected=time.monotonic(), action="server-restart")
        self.log(f"watchdog: tritonserver died (exit code {code}); starting it again")
        with self._lock:
            dead = list(self.stubs.values())
        self.remove_shm(dead)
        try:
            self.server.restart_after_crash()
        except Exception as e:
            heal.error = str(e)
            self.log(f"watchdog: tritonserver could not be started again: {e}")
            self._stop.wait(2.0)
            return
        with self._lock:
            self.stubs.clear()
            self._zombie_since.clear()
            self._handled.clear()
            self.stranded.clear()
        self._models.clear()
        heal.serving_after = time.monotonic() - heal.detected
        self.heals.append(heal)
        self.log(f"watchdog: tritonserver serving again {heal.serving_after:.1f}s after it died")
        self.scan()

    def _heal_due(self) -> None:
        now = time.monotonic()
        for model, state in list(self._models.items()):
            if not state.dead or now < state.next_attempt or self._stop.is_set():
                continue
            assert state.heal is not None
            heal = state.heal
            heal.attempts += 1
            try:
                self._reload(model, heal)
            except Exception as e:
                heal.error = str(e)
                state.next_attempt = time.monotonic() + state.backoff
                self.log(f"watchdog: model '{model}' could not be reloaded (attempt {heal.attempts}): {e}; "
                         f"retrying in {state.backoff:.0f}s")
                state.backoff = min(state.backoff * 2, 60.0)
                continue
            heal.error = None
            heal.serving_after = time.monotonic() - heal.detected
            self.remove_shm(list(state.dead.values()))
            self.log(f"watchdog: model '{model}' serving again {heal.serving_after:.2f}s after its stub "
                     f"died ({heal.action})")
            self.heals.append(heal)
            self._models.pop(model, None)

    def _reload(self, model: str, heal: Heal) -> None:
        # Every model READY now (the ensembles over this one included) must be READY again before
        # the model counts as serving: Triton reloads dependent ensembles itself, once their old
        # version has drained.
        expected = set(self.server.ready_models()) | {model}
        alive = self.alive(model)
        with self._lock:
            self.stranded.update(pid for pid, s in self.stubs.items() if s.model == model)
        if alive:
            heal.action = "reload-in-place"
            config = self._config(model)
            count = self._restarts.get(model, 0) + 1
            config.setdefault("parameters", {})[RESTARTS_PARAMETER] = {"string_value": str(count)}
            self._repository("load", model, {"parameters": {"config": json.dumps(config)}})
            self._restarts[model] = count
        else:
            heal.action = "reload"
            # Unloading first makes the model's (and, with strict readiness, the server's) readiness
            # say "not ready" while it cannot serve. The unload itself may never finish (the old
            # version stays referenced by a request that failed on the dead stub); the load that
            # follows does not wait for it.
            self._repository("unload", model, {})
            self._repository("load", model, {})
        self._wait_ready(expected)

    def _config(self, model: str) -> dict:
        status, body = self.server.http("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise RuntimeError(f"cannot read its config (HTTP {status})")
        return json.loads(body)

    def _repository(self, action: str, model: str, payload: dict) -> None:
        status, body = self.server.http("POST", f"/v2/repository/models/{model}/{action}",
                                        json.dumps(payload).encode(), timeout=self.load_timeout)
        if status != 200:
            try:
                reason = json.loads(body).get("error", "")
            except ValueError:
                reason = body[:300].decode(errors="replace")
            raise RuntimeError(f"{action} failed (HTTP {status}): {reason}")

    def _wait_ready(self, models: set[str]) -> None:
        deadline = time.monotonic() + self.load_timeout
        reloaded = False
        while not self._stop.is_set():
            missing = models - set(self.server.ready_models())
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"loaded, but {', '.join(sorted(missing))} not READY "
                                   f"within {self.load_timeout:.0f}s")
            if not reloaded and time.monotonic() > deadline - self.load_timeout + 5:
                reloaded = True  # a dependent ensemble still missing after 5 s: ask for it
                for name in sorted(missing):
                    with contextlib.suppress(RuntimeError):
                        self._repository("load", name, {})
            time.sleep(0.05)
