"""Waiting in tests, always bounded: background load, a condition, a child process's output.

A test that waits without a deadline hangs the suite until pytest-timeout ends it, far from the
cause; a thread that dies quietly leaves a test counting nothing and passing. Here every wait has a
deadline and every worker's exception reaches the test:

- ``Background``: worker threads that repeat a step until the test stops them, a worker raises, or
  the deadline passes; each step's outcome counted; the first exception re-raised in the test at
  its next wait or at the end of the ``with``; a thread that does not stop within ``join_timeout``
  fails the test with its stack;
- ``wait_for``: poll a condition until it holds or a deadline passes;
- ``read_until``: a child's stdout up to a marker line, failing with what it said when it goes quiet.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

__all__ = ["Background", "Task", "read_until", "wait_for"]


def wait_for(predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
    """``predicate()``'s first truthy value within ``timeout`` seconds, else its last (falsy) one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(step)
    return predicate()


def read_until(process: subprocess.Popen, marker: str, timeout: float) -> list[str]:
    """The lines ``process`` writes to its (piped) stdout up to and including the first that contains
    ``marker``, or all of them if it closes stdout first. Fails, with what it said, if neither happens
    within ``timeout`` s: a child that goes quiet is not waited for line by line for ever."""
    fd = process.stdout.fileno()
    deadline = time.monotonic() + timeout
    data, wanted = b"", marker.encode()
    while (at := data.find(wanted)) < 0 or b"\n" not in data[at:]:   # the marker's line, to its end
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} from pid {process.pid} within {timeout:.0f}s "
                                 f"(exit code {process.poll()}); it said:\n{data.decode(errors='replace')}")
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").splitlines(keepends=True)


class Task:
    """One call run once in a ``Background`` thread: ``done`` is set when it returns or raises."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None

    def result(self) -> Any:
        assert self.done.is_set(), "the task has not finished"
        return self.value


class Background:
    """Worker threads for one test, bounded by a stop event and a deadline.

    ``with Background(seconds=60) as load:`` starts nothing; ``load.loop(step, threads=16,
    context=...)`` starts threads that each repeat ``step(resource)`` (``resource``: what the thread's
    own ``context()`` yields, e.g. a client) and count what it returns in ``load.counts`` (``None``
    is not counted); ``load.once(call)`` runs ``call()`` once. The test waits with ``load.sleep`` and
    ``load.until``, which raise at once when a worker has failed. Leaving the ``with`` stops and joins
    every thread, then raises the first worker exception, or an AssertionError naming (with their
    stacks) the threads that did not stop within ``join_timeout``, or one saying that the load ran
    into its deadline (``seconds`` from the start) before the test stopped it.

    Every blocking call in a step needs its own timeout shorter than ``join_timeout``: a stop is
    noticed between steps.
    """

    def __init__(self, seconds: float, join_timeout: float = 30.0, name: str = "load"):
        self.seconds, self.join_timeout, self.name = seconds, join_timeout, name
        self.deadline = time.monotonic() + seconds
        self.stop = threading.Event()
        self.counts: Counter = Counter()
        self.errors: list[tuple[str, BaseException]] = []
        self.expired = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    # --- starting work ------------------------------------------------------------------------------

    def loop(self, step: Callable[..., Hashable | None], *, threads: int = 1,
             context: Callable[[], AbstractContextManager] | None = None, name: str = "") -> Background:
        """Start ``threads`` threads, each repeating ``step(resource)`` (``step()`` without ``context``)."""
        label = name or getattr(step, "__name__", "step")
        for i in range(threads):
            self._start(f"{self.name}-{label}-{i}", self._repeat, step, context)
        return self

    def once(self, call: Callable[[], Any], *, name: str = "") -> Task:
        """Run ``call()`` once in a thread; its value in ``.result()``, its exception fails the load."""
        task = Task()
        self._start(f"{self.name}-{name or getattr(call, '__name__', 'once')}", self._once, call, task)
        return task

    def _start(self, name: str, target: Callable, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _repeat(self, step: Callable, context: Callable[[], AbstractContextManager] | None) -> None:
        try:
            with context() if context is not None else nullcontext() as resource:
                while not self.stop.is_set():
                    if time.monotonic() > self.deadline:
                        self.expired = True
                        self.stop.set()
                        return
                    outcome = step(resource) if context is not None else step()
                    if outcome is not None:
                        with self._lock:
                            self.counts[outcome] += 1
        except BaseException as e:  # every failure goes to the test, none is lost
            self._failed(e)

    def _once(self, call: Callable[[], Any], task: Task) -> None:
        try:
            task.value = call()
        except BaseException as e:  # every failure goes to the test, none is lost
            self._failed(e)
        finally:
            task.done.set()

    def _failed(self, error: BaseException) -> None:
        error.add_note(f"(raised in background thread {threading.current_thread().name!r})")
        with self._lock:
            self.errors.append((threading.current_thread().name, error))
        self.stop.set()

    # --- waiting in the test ------------------------------------------------------------------------

    def count(self, outcome: Hashable, n: int = 1) -> None:
        """Count an outcome from inside a step (for steps that record more than one)."""
        with self._lock:
            self.counts[outcome] += n

    def check(self) -> None:
        """Raise the first worker's exception, or say that the load outlived its deadline."""
        if self.errors:
            raise self.errors[0][1]
        if self.expired or time.monotonic() > self.deadline:
            self.expired = True
            raise AssertionError(f"{self.name}: still running after its deadline of {self.seconds:.0f}s")

    def sleep(self, seconds: float) -> None:
        """Sleep while the workers run; raise at once when one fails."""
        if seconds > 0:   # not past the deadline: a sleep that would cross it fails there
            self.stop.wait(min(seconds, max(0.0, self.deadline - time.monotonic()) + 0.01))
        self.check()

    def until(self, predicate: Callable[[], Any], timeout: float, step: float = 0.05) -> Any:
        """``wait_for`` that raises at once when a worker fails."""
        deadline = time.monotonic() + timeout
        while True:
            self.check()
            if (value := predicate()) or time.monotonic() >= deadline:
                return value
            self.stop.wait(step)

    # --- the end ------------------------------------------------------------------------------------

    def __enter__(self) -> Background:
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.stop.set()
        until = time.monotonic() + self.join_timeout
        for thread in self._threads:
            thread.join(max(0.0, until - time.monotonic()))
        stuck = [t for t in self._threads if t.is_alive()]
        for thread in stuck:
            thread.reported = True   # type: ignore[attr-defined]  # once, here, not again by conftest
        problems = []
        if self.errors:
            problems.append(self.errors[0][1])
        if stuck:
            frames = sys._current_frames()
            stacks = "".join(f"\n--- {t.name}\n" + "".join(traceback.format_stack(frames[t.ident]))
                             for t in stuck if t.ident in frames)
            problems.append(AssertionError(f"{self.name}: {len(stuck)} thread(s) still running "
                                           f"{self.join_timeout:.0f}s after the stop:{stacks}"))
        if self.expired and not self.errors:
            problems.append(AssertionError(f"{self.name}: ran into its deadline of {self.seconds:.0f}s "
                                           "before the test stopped it"))
        if not problems:
            return
        first = error if error is not None else problems[0]   # the test's own failure comes first
        for problem in problems:
            if problem is not first:
                first.add_note(f"also: {problem!r}" if not isinstance(problem, AssertionError) else str(problem))
        if error is None:
            raise first
