"""tests/bounded.py, the suite's one way to wait: a worker that dies fails its test within moments
with its own exception, a worker that never stops is reported with its stack, a load that outlives
its deadline says so, and a child that goes quiet is not waited for line by line."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from bounded import Background, read_until, wait_for

pytestmark = pytest.mark.timeout(60)


def test_a_worker_that_dies_fails_the_test_in_moments_with_its_own_exception():
    calls = iter(range(1000))

    def step():
        if next(calls) == 20:
            raise ConnectionError("the server went away")
        time.sleep(0.001)
        return "answered"

    started = time.monotonic()
    with (pytest.raises(ConnectionError, match="the server went away") as failed,
          Background(seconds=120) as load):
        load.loop(step, threads=4)
        load.sleep(100)   # what a test does while its load runs: not 100 s here
    assert time.monotonic() - started < 5
    assert any("raised in background thread 'load-step-" in note for note in failed.value.__notes__)
    assert load.stop.is_set() and 20 <= load.counts["answered"] <= 23   # counted until it failed
    assert not any(t.name.startswith("load-") for t in threading.enumerate())   # all joined


def test_a_task_that_dies_ends_a_wait_for_it_at_once():
    def attack():
        time.sleep(0.2)
        raise TimeoutError("client timeout")

    started = time.monotonic()
    with (pytest.raises(TimeoutError, match="client timeout"),
          Background(seconds=120) as load):
        task = load.once(attack)
        load.loop(lambda: time.sleep(0.01) or "normal")
        load.until(task.done.is_set, timeout=100)
        load.sleep(100)
    assert time.monotonic() - started < 5
    assert load.counts["normal"] > 0


def test_a_worker_that_never_stops_is_reported_with_its_stack():
    release = threading.Event()

    def stuck_in_a_call_without_timeout():
        release.wait(30)   # stands for a client call that ignores the stop

    started = time.monotonic()
    try:
        with (pytest.raises(AssertionError, match=r"1 thread\(s\) still running 1s after the stop") as failed,
              Background(seconds=120, join_timeout=1) as load):
            load.loop(stuck_in_a_call_without_timeout)
            load.sleep(0.2)
    finally:
        release.set()
    assert time.monotonic() - started < 5
    assert "stuck_in_a_call_without_timeout" in str(failed.value)
    assert "release.wait(30)" in str(failed.value)


def test_a_load_the_test_never_stops_ends_at_its_deadline_and_fails():
    started = time.monotonic()
    with (pytest.raises(AssertionError, match="after its deadline of 1s"),
          Background(seconds=1) as load):
        load.loop(lambda: time.sleep(0.01) or "answered", threads=2)
        load.sleep(60)
    assert time.monotonic() - started < 5
    assert load.counts["answered"] > 10


def test_a_clean_load_counts_every_outcome_and_leaves_no_thread():
    with Background(seconds=30) as load:
        load.loop(lambda client: client["answer"], threads=3, context=lambda: _Resource("ok"))
        task = load.once(lambda: 42)
        assert load.until(lambda: load.counts["ok"] >= 30, timeout=10)
    assert task.result() == 42 and load.counts["ok"] >= 30 and set(load.counts) == {"ok"}
    assert _Resource.closed == 3


def test_the_tests_own_failure_is_kept_and_a_worker_failure_added_to_it():
    with (pytest.raises(AssertionError, match="the test's own assertion") as failed,
          Background(seconds=30) as load):
        load.once(lambda: 1 / 0)
        wait_for(lambda: load.errors, 5)
        raise AssertionError("the test's own assertion")
    assert any("ZeroDivisionError" in note for note in failed.value.__notes__)


def test_read_until_returns_the_lines_up_to_the_marker_and_fails_when_the_child_goes_quiet():
    code = ("import sys, time; print('one'); print('Press Ctrl-C', end='', flush=True); time.sleep(0.3); "
            "print(' to stop.', flush=True); time.sleep(30)")   # the marker's line arrives in two writes
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert read_until(child, "Press Ctrl-C", 20) == ["one\n", "Press Ctrl-C to stop.\n"]
        started = time.monotonic()
        with pytest.raises(AssertionError, match=r"no 'never said' from pid \d+ within 1s"):
            read_until(child, "never said", 1)
        assert time.monotonic() - started < 3
    finally:
        child.kill()
        child.wait(timeout=10)


class _Resource:
    closed = 0

    def __init__(self, answer: str):
        self.answer = answer

    def __enter__(self):
        return {"answer": self.answer}

    def __exit__(self, *exc):
        type(self).closed += 1
