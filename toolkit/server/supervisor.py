"""The one supervisor of "this tritonserver and its python stubs serve", for one server and for
each replica of a ``ReplicaSet``.

What it does, every ``interval`` seconds (the detection window), from one thread that never waits
on Triton:

- **a dead tritonserver** (killed, or aborted by the python backend when a stub died holding a lock
  they share) is started again on its ports, with exponential backoff between failed starts; after
  ``server_restart_limit`` restarts within ``server_restart_window`` it gives up, and
  ``TritonServer.wait`` returns;
- **a dead stub** (a zombie child of tritonserver, see ``toolkit/server/stubs.py``) gets its model
  healed by a worker thread of that model: unloaded at once when no instance of it is left (so
  readiness says "not ready"), then loaded again after a backoff that doubles with every failed
  attempt; a model with live instances left is reloaded in place. Models heal independently: a
  slow or failing model never holds up another's heal;
- **a crash loop** (more than ``crash_loop_limit`` heals of one model within ``crash_loop_window``)
  marks the model FAILED, as Kubernetes' CrashLoopBackOff makes it visible: it is unloaded
  (readiness false), one log line says so, and ``counters`` / ``metrics_text`` count it;
- **a wedged load** (a model LOADING with no live stub of it for ``stubless_loading`` seconds, or
  LOADING longer than ``load_timeout``) restarts tritonserver on its ports: nothing else unwedges it
  (see below).

Every repository call has a short timeout, and every heal's repository change (unload, load) is
made holding the repository lock (``toolkit/files.py``) for at most ``lock_wait`` seconds
of waiting; when a rollout or rollback holds it, the heal is tried again on the next tick.

The wedge, measured on the bundled tritonserver 2.51 (python backend r24.10): with auto-complete on
(Triton's default), every load starts a model-level stub first, just to ask the model for its config;
a stub killed then leaves ``TRITONBACKEND_ModelInitialize`` waiting for it forever: the model stays
LOADING, and every load or unload of that model blocks (an unload waited 10 s, a load 68 s, until the
server was stopped). ``TritonServer`` therefore starts tritonserver with
``--disable-auto-complete-config`` (gen-repo writes complete configs and the toolkit's model.py has
no ``auto_complete_config``): no model-level stub, and a stub killed while its instance initialises
makes the load fail (``Stub process ... is not healthy``) instead of hanging. The wedge check stays
as a last resort.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Protocol

from toolkit.client.admin import TritonAdmin
from toolkit.errors import TritonAdminError
from toolkit.files import RepositoryBusy, RepositoryLock, heal_purpose
from toolkit.server.stubs import _ZOMBIE_GRACE, RESTARTS_PARAMETER, SHM_DIR, Heal, Stub, _children, exit_status


class Supervised(Protocol):
    """What the supervisor needs of a server (``TritonServer``; this module never imports it)."""

    repository: Path
    process: Popen | None

    @property
    def admin(self) -> TritonAdmin: ...

    def ready_models(self) -> list[str]: ...

    def _kill_group(self) -> None: ...

    def _relaunch(self, timeout: float = 180.0) -> None: ...


@dataclass(frozen=True)
class SupervisorPolicy:
    """How the supervisor heals; the defaults suit ``toolkit serve`` on a small machine."""

    interval: float = 0.1                 # seconds between scans: the detection window
    call_timeout: float = 10.0            # a load call; unload, config and index calls get 3 s
    lock_wait: float = 1.0                # wait at most this long for the repository lock
    backoff_base: float = 0.5             # before the 2nd consecutive attempt; doubles after each failure
    backoff_max: float = 2.0               # short: a model must serve again within 10 s of its last crash
    crash_loop_limit: int = 15            # heals of one model within the window before it is FAILED
    crash_loop_window: float = 120.0
    load_timeout: float = 60.0            # LOADING longer than this: wedged
    stubless_loading: float = 5.0         # LOADING without a live stub this long: wedged
    server_restart_limit: int = 5         # tritonserver restarts within the window before giving up
    server_restart_window: float = 300.0
    start_timeout: float = 180.0          # a restarted tritonserver must be ready within this


@dataclass
class _PendingLoad:
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class Wedged(RuntimeError):
    """Triton cannot finish loading a model; only a restart of tritonserver clears it."""


class _Stale(RuntimeError):
    """The server this heal was for has been restarted (or is stopping)."""


@dataclass
class _ModelState:
    dead: dict[int, Stub] = field(default_factory=dict)
    attempts: deque = field(default_factory=deque)    # monotonic times of heal attempts (crash-loop window)
    consecutive_failures: int = 0
    worker: threading.Thread | None = None
    heal: Heal | None = None
    failed: bool = False


class Supervisor:
    """Keeps ``server`` (a started ``TritonServer``) and its stubs serving. ``heal=False`` only
    watches (records stubs, removes dead stubs' shared memory at stop) for model control modes
    without a repository API; ``restart_server=False`` leaves a dead tritonserver dead."""

    def __init__(self, server: Supervised, *, policy: SupervisorPolicy | None = None, heal: bool = True,
                 restart_server: bool = True, log: Callable[[str], None] | None = None):
        self.server = server
        self.policy = policy or SupervisorPolicy()
        self.interval = self.policy.interval
        self.heal_enabled, self.restart_server = heal, restart_server
        self.log = log or (lambda message: None)
        self.lock = RepositoryLock(server.repository)
        self.stubs: dict[int, Stub] = {}          # every stub seen alive, by pid
        #: Stubs of model versions replaced after a crash: tritonserver may never finish unloading
        #: those versions, so they do not count when judging a drain.
        self.stranded: set[int] = set()
        self.heals: list[Heal] = []
        #: Models marked FAILED after a crash loop (unloaded; readiness false).
        self.failed: set[str] = set()
        #: Prometheus-style counters: (name, model or "") -> count. See ``metrics_text``.
        self.counters: Counter = Counter()
        #: Set when tritonserver died and could not be kept up: why. ``TritonServer.wait`` returns then.
        self.gave_up: str | None = None
        self.given_up = threading.Event()
        self._zombie_since: dict[int, float] = {}
        self._handled: set[int] = set()
        self._models: dict[str, _ModelState] = {}
        self._restarts: dict[str, int] = {}
        self._server_restarts: deque = deque()
        self._server_failures = 0
        self._next_server_attempt = 0.0
        self._wedged: str | None = None
        self._generation = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()

    # --- life cycle ------------------------------------------------------------------------------

    def start(self) -> Supervisor:
        self.scan()
        self._published: str | None = None
        self._thread = threading.Thread(target=self._run, name="toolkit-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.policy.start_timeout + 10)
            self._thread = None
        with self._lock:
            workers = [s.worker for s in self._models.values() if s.worker is not None]
        for worker in workers:   # each is inside one call with a short timeout at most
            worker.join(timeout=self.policy.call_timeout + 5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
                self._publish()
            except Exception as e:  # the supervisor must outlive any surprise
                self.log(f"watchdog: {type(e).__name__}: {e}")
        with contextlib.suppress(OSError):
            self.metrics_file.unlink()

    @property
    def metrics_file(self) -> Path:
        """``metrics_text`` as a file beside the served repository (``build/.model_repository.prom``),
        rewritten whenever a count changes: what node_exporter's textfile collector, a script or an
        operator reads (Triton's own metrics port carries Triton's and the hooks' metrics only)."""
        repository = Path(self.server.repository)
        return repository.parent / f".{repository.name}.prom"

    def _publish(self) -> None:
        text = self.metrics_text()
        if text == self._published:
            return
        tmp = self.metrics_file.with_name(f"{self.metrics_file.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.metrics_file)
        self._published = text

    def tick(self) -> None:
        process = self.server.process
        if process is not None and process.poll() is not None:
            if self.restart_server and self.gave_up is None:
                self._restart_server(f"exit code {process.returncode}")
            elif self.gave_up is None:
                self._give_up(f"tritonserver exited with code {process.returncode}")
            return
        if self._wedged is not None and self.restart_server:
            self._restart_server(self._wedged, wedged=True)
            return
        self.scan()
        if self.heal_enabled:
            self._start_heals()

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
                        if stub.model in self.failed:   # loaded again by someone: supervise it again
                            self.failed.discard(stub.model)
                            self._models.pop(stub.model, None)
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
                    # A stub of a version being unloaded (a rollout's reload) exits cleanly and can
                    # stay a zombie a while on a busy machine: only a kill or a failure is a crash.
                    if exit_status(pid) != 0:
                        died.append(stub)
            for stub in died:
                self.counters[("stub_deaths_total", stub.model)] += 1
                self.log(f"watchdog: stub '{stub.instance}' (pid {stub.pid}) of model '{stub.model}' died")
                state = self._models.setdefault(stub.model, _ModelState())
                if state.failed:
                    continue
                state.dead[stub.pid] = stub
                if state.heal is None:
                    state.heal = Heal(stub.model, [], detected=now)
                state.heal.instances.append(stub.instance)
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

    def metrics_text(self) -> str:
        """The counters in Prometheus' text format (``toolkit_supervisor_<name>{model="..."}``)."""
        lines = []
        with self._lock:
            items = sorted(self.counters.items())
            failed = sorted(self.failed)
        for (name, model), value in items:
            label = f'{{model="{model}"}}' if model else ""
            lines.append(f"toolkit_supervisor_{name}{label} {value}")
        lines += [f'toolkit_supervisor_model_failed{{model="{m}"}} 1' for m in failed]
        return "\n".join(lines) + "\n"

    # --- tritonserver ----------------------------------------------------------------------------

    def _give_up(self, reason: str) -> None:
        self.gave_up = reason
        self.counters[("gave_up_total", "")] += 1
        self.log(f"watchdog: giving up on tritonserver: {reason}")
        self.given_up.set()

    def _restart_server(self, reason: str, *, wedged: bool = False) -> None:
        """Start tritonserver again on its ports: it died, or a load wedged it (then it is killed
        first, holding the repository lock so no rollout is cut in half)."""
        now = time.monotonic()
        if now < self._next_server_attempt:
            return
        window = self.policy.server_restart_window
        while self._server_restarts and now - self._server_restarts[0] > window:
            self._server_restarts.popleft()
        if len(self._server_restarts) >= self.policy.server_restart_limit:
            self._give_up(f"{len(self._server_restarts)} restarts within {window:.0f}s; last: {reason}")
            return
        self._server_restarts.append(now)
        heal = Heal("tritonserver", [reason], detected=now, action="server-restart")
        with self._lock:
            self._generation += 1     # heals in flight are for the old server: they stop
            dead = list(self.stubs.values())
        if wedged:
            self.log(f"watchdog: tritonserver is wedged ({reason}); restarting it")
            try:
                with self.lock.hold("restart of a wedged tritonserver", wait=self.policy.lock_wait):
                    self.server._kill_group()
            except RepositoryBusy:
                self._server_restarts.pop()
                return
        else:
            self.log(f"watchdog: tritonserver died ({reason}); starting it again")
        self.counters[("server_restarts_total", "")] += 1
        self.remove_shm(dead)
        try:
            self.server._relaunch(timeout=self.policy.start_timeout)
        except Exception as e:
            heal.error = str(e)
            self._server_failures += 1
            delay = min(self.policy.backoff_base * 2 ** self._server_failures, 30.0)
            self._next_server_attempt = time.monotonic() + delay
            self.log(f"watchdog: tritonserver could not be started again: {e}; retrying in {delay:.0f}s")
            return
        self._server_failures = 0
        self._wedged = None
        with self._lock:
            self.stubs.clear()
            self._zombie_since.clear()
            self._handled.clear()
            self.stranded.clear()
            self._models = {m: _ModelState(failed=True) for m in self.failed}
        heal.serving_after = time.monotonic() - heal.detected
        self.heals.append(heal)
        self.log(f"watchdog: tritonserver serving again {heal.serving_after:.1f}s after it died")
        for model in sorted(self.failed):   # a FAILED model stays unloaded
            with contextlib.suppress(Exception):
                self.server.admin.unload(model, timeout=3)
        self.scan()

    # --- models ----------------------------------------------------------------------------------

    def _start_heals(self) -> None:
        with self._lock:
            for model, state in self._models.items():
                if state.dead and not state.failed and (state.worker is None or not state.worker.is_alive()):
                    state.worker = threading.Thread(target=self._heal_model, args=(model, self._generation),
                                                    name=f"toolkit-heal-{model}", daemon=True)
                    state.worker.start()

    def _current(self, generation: int) -> None:
        if self._stop.is_set() or generation != self._generation:
            raise _Stale()

    def _heal_model(self, model: str, generation: int) -> None:
        """The worker of one model: heal attempts until it serves, fails or the server changes."""
        p = self.policy
        waiting_logged = False
        try:
            while True:
                self._current(generation)
                with self._lock:
                    state = self._models[model]
                    if not state.dead:
                        return
                    now = time.monotonic()
                    while state.attempts and now - state.attempts[0] > p.crash_loop_window:
                        state.attempts.popleft()
                    if len(state.attempts) >= p.crash_loop_limit:
                        self._mark_failed(model, state, generation)
                        return
                    delay = 0.0 if state.consecutive_failures == 0 else \
                        min(p.backoff_base * 2 ** (state.consecutive_failures - 1), p.backoff_max)
                if delay and not self.alive(model):
                    self._unload_now(model, generation)   # readiness false while it backs off
                if self._stop.wait(delay):
                    return
                self._current(generation)
                with self._lock:
                    dead, state.dead = state.dead, {}
                    heal = state.heal or Heal(model, [], detected=time.monotonic())
                    state.heal = heal
                    state.attempts.append(time.monotonic())
                heal.attempts += 1
                try:
                    self._reload(model, heal, generation)
                except RepositoryBusy as e:
                    with self._lock:
                        state.dead.update(dead)
                        state.attempts.pop()
                    heal.attempts -= 1
                    if not waiting_logged:   # one line per wait, not one per retry
                        self.log(f"watchdog: heal of '{model}' waits: {e}")
                        waiting_logged = True
                    self._stop.wait(self.interval)
                    continue
                except Wedged as e:
                    self._wedged = f"model '{model}': {e}"
                    return
                except _Stale:
                    raise
                except Exception as e:
                    heal.error = str(e)
                    with self._lock:
                        state.dead.update(dead)
                        state.consecutive_failures += 1
                        n = state.consecutive_failures
                    retry = min(p.backoff_base * 2 ** (n - 1), p.backoff_max)
                    self.counters[("heal_failures_total", model)] += 1
                    self.log(f"watchdog: model '{model}' could not be reloaded (attempt {heal.attempts}): {e}; "
                             f"retrying in {retry:.1f}s")
                    continue
                heal.error = None
                heal.serving_after = time.monotonic() - heal.detected
                self.remove_shm(list(dead.values()))
                self.counters[("heals_total", model)] += 1
                self.log(f"watchdog: model '{model}' serving again {heal.serving_after:.2f}s after its stub "
                         f"died ({heal.action})")
                with self._lock:
                    self.heals.append(heal)
                    state.heal = None
                    state.consecutive_failures = 0
        except _Stale:
            return

    def _mark_failed(self, model: str, state: _ModelState, generation: int) -> None:
        state.failed, state.dead = True, {}
        self.failed.add(model)
        heal = state.heal or Heal(model, [], detected=time.monotonic())
        heal.action, heal.error = "failed", "crash loop"
        self.heals.append(heal)
        self.counters[("crash_loop_failures_total", model)] += 1
        p = self.policy
        self.log(f"watchdog: model '{model}' is crash-looping ({len(state.attempts)} heals within "
                 f"{p.crash_loop_window:.0f}s): marked FAILED and unloaded; load it again through the "
                 "repository API or restart the server")
        threading.Thread(target=self._unload_failed, args=(model, generation), daemon=True).start()

    def _unload_failed(self, model: str, generation: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self._stop.is_set() and generation == self._generation:
            try:
                self._unload_now(model, generation)
                return
            except RepositoryBusy:
                self._stop.wait(self.interval)
            except Exception:
                self._stop.wait(1.0)

    def _unload_now(self, model: str, generation: int) -> None:
        with self.lock.hold(heal_purpose(model), wait=self.policy.lock_wait):
            self._current(generation)
            self.server.admin.unload(model, timeout=3)

    def _reload(self, model: str, heal: Heal, generation: int) -> None:
        # Every model READY now (the ensembles over this one included) must be READY again before
        # the model counts as serving: Triton reloads dependent ensembles itself.
        expected = set(self.server.ready_models()) | {model}
        alive = self.alive(model)
        with self._lock:
            self.stranded.update(pid for pid, s in self.stubs.items() if s.model == model)
        started = time.monotonic()
        with self.lock.hold(heal_purpose(model), wait=self.policy.lock_wait):
            self._current(generation)
            if alive:
                heal.action = "reload-in-place"
                config = self.server.admin.config(model, timeout=3)
                count = self._restarts.get(model, 0) + 1
                config.setdefault("parameters", {})[RESTARTS_PARAMETER] = {"string_value": str(count)}
                self._restarts[model] = count
                load = self._load_in_background(model, config)
            else:
                heal.action = "reload"
                # Unloading first makes readiness say "not ready" while it cannot serve; the load
                # that follows does not wait for the old version to go.
                self.server.admin.unload(model, timeout=3)
                load = self._load_in_background(model, None)
            self._wait_ready(model, expected, started, generation, load)

    def _load_in_background(self, model: str, config: dict | None) -> _PendingLoad:
        """Start a load call without waiting for it: Triton answers it only once the model and the
        ensembles over it are reloaded (the index shows the old version READY until then), while a
        wedged load never answers; ``_wait_ready`` watches both."""
        pending = _PendingLoad()

        def call() -> None:
            try:
                self.server.admin.load(model, config, timeout=self.policy.load_timeout + 5)
            except TritonAdminError as e:
                pending.error = str(e)
            except Exception as e:
                pending.error = f"{type(e).__name__}: {e}"
            finally:
                pending.done.set()

        threading.Thread(target=call, name=f"toolkit-load-{model}", daemon=True).start()
        return pending

    def _index(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for entry in self.server.admin.index(timeout=3):   # one entry per version: a READY one wins
            if entry.get("name") not in out or entry.get("state") == "READY":
                out[entry.get("name")] = entry
        return out

    def _ensembles_over(self, model: str, names: set[str]) -> list[str]:
        """Those of ``names`` that are ensembles with a step on ``model``."""
        found = []
        for name in sorted(names):
            with contextlib.suppress(TritonAdminError):
                config = self.server.admin.config(name, timeout=3)
                steps = config.get("ensemble_scheduling", {}).get("step", [])
                if config.get("platform") == "ensemble" and any(s.get("model_name") == model for s in steps):
                    found.append(name)
        return found

    def _fresh_stub(self, model: str) -> bool:
        """A stub started by this heal is live (the supervisor's own scan records new stubs)."""
        with self._lock:
            stranded = set(self.stranded)
        return any(stub.pid not in stranded for stub in self.alive(model))

    def _wait_ready(self, model: str, expected: set[str], started: float, generation: int,
                    load: _PendingLoad) -> None:
        p = self.policy
        stubless_since: float | None = None
        asked_again = False
        while True:
            self._current(generation)
            try:
                index = self._index()
            except TritonAdminError:
                if self.server.process is None or self.server.process.poll() is not None:
                    raise _Stale() from None
                index = {}
            now = time.monotonic()
            states = {name: index.get(name, {}).get("state") for name in expected}
            # READY alone is not enough: until Triton has processed the unload, the index still shows
            # the old version, whose stub is dead. Serving means a stub started by this heal is live.
            if load.error is not None:
                raise RuntimeError(f"load failed: {load.error}")
            if load.done.is_set() and all(s == "READY" for s in states.values()) and self._fresh_stub(model):
                # The ensembles over the model switch to its new instances only when they reload,
                # which Triton does after the load has answered: ask for it, and wait for it.
                for name in self._ensembles_over(model, expected - {model}):
                    with contextlib.suppress(TritonAdminError):
                        self.server.admin.load(name, timeout=self.policy.call_timeout)
                return
            mine = index.get(model, {})
            # Until the load call answers, UNAVAILABLE may still be the unload this heal just made
            # ("unloaded"): Triton has not begun the load. Taken as a failure, the heal's backoff
            # unloaded the version that then loaded, again and again, until the crash-loop limit.
            # A load that fails answers with its reason (load.error above).
            if mine.get("state") == "UNAVAILABLE" and load.done.is_set():
                raise RuntimeError(f"load failed: {mine.get('reason') or 'unavailable'}")
            if mine.get("state") == "LOADING":
                if self.alive(model):
                    stubless_since = None
                else:
                    stubless_since = stubless_since or now
                    if now - stubless_since > p.stubless_loading:
                        raise Wedged(f"LOADING without a live stub for {p.stubless_loading:.0f}s")
            if now - started > p.load_timeout:
                if mine.get("state") == "LOADING":
                    raise Wedged(f"LOADING for {p.load_timeout:.0f}s")
                missing = sorted(n for n, s in states.items() if s != "READY")
                raise RuntimeError(f"loaded, but {', '.join(missing)} not READY within {p.load_timeout:.0f}s")
            if not asked_again and mine.get("state") == "READY" and now - started > 5:
                asked_again = True   # a dependent ensemble still missing after 5 s: ask for it
                for name in sorted(n for n, s in states.items() if s != "READY"):
                    with contextlib.suppress(TritonAdminError):  # the caller holds the repository lock
                        self.server.admin.load(name, timeout=self.policy.call_timeout)
            time.sleep(0.05)
