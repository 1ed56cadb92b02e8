"""Per-hook Prometheus metrics on Triton's own ``/metrics`` (Paddle Serving's ``regist_metric``).

The adapter registers them with the python backend's custom metrics API (``pb_utils.MetricFamily``),
labelled by model and version, so they appear on Triton's metrics port beside Triton's own:

    toolkit_hook_requests_total{model,version}            requests handed to the hook
    toolkit_hook_failures_total{model,version,code}       requests answered with an error, by code
    toolkit_hook_api_entry_duration_seconds{model,version}  histogram, one sample per request
    toolkit_hook_infer_duration_seconds{model,version}    histogram, one sample per infer call
    toolkit_hook_batch_rows{model,version}                histogram of rows per infer call

Every metric update is a message from the stub to tritonserver that waits for its answer (~0.1 ms
each, four or more per batch), so samples are collected in the stub and handed over once per
``execute`` (one dynamic batch) to a sender thread, one per stub process, which sends them while the
responses are already on their way: counters as one increment, histogram samples as they came. The
python backend sends a metric update under its own lock with the GIL released, so the thread neither
races the stub nor stalls the next batch. Off the answer's path this saves 0.2-0.25 ms per step and
request at c=1 (BENCHMARKS.md, "Routes to the roofline"). ``drain()`` (the adapter's ``finalize``)
sends what is left before the model unloads; a reader of ``/metrics`` right after an answer may see
its samples a moment later. This file is imported inside Triton's python stub: numpy-free, Python 3.10.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from toolkit.runtime.batching import Failure, Observer

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class _Sender:
    """The stub's one metrics thread: runs each handed-over batch of updates in order. Each thread
    has a queue of its own, so the stop that ``drain`` sends can only reach the thread it drains."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue | None = None  # the running thread's
        self._thread: threading.Thread | None = None

    def submit(self, send: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._run, args=(self._queue,), name="toolkit-metrics",
                                                daemon=True)
                self._thread.start()
            self._queue.put(send)

    @staticmethod
    def _run(sends: queue.SimpleQueue) -> None:
        while (send := sends.get()) is not None:
            send()

    def drain(self, timeout: float = 5.0) -> None:
        """Send everything submitted so far, then stop the thread (the next ``submit`` starts another)."""
        with self._lock:
            thread, sends, self._thread, self._queue = self._thread, self._queue, None, None
        if thread is not None and thread.is_alive():
            sends.put(None)
            thread.join(timeout)


_SENDER = _Sender()


def drain(timeout: float = 5.0) -> None:
    """Send every metric update this process has handed over (call before the model unloads)."""
    _SENDER.drain(timeout)


class HookMetrics(Observer):
    def __init__(self, pb_utils: Any, model: str, version: str, log: Any = None,
                 families: dict[str, Any] | None = None):
        self._log, self._warned = log, False
        family = pb_utils.MetricFamily
        self._labels = {"model": model, "version": str(version)}

        #: Triton drops a metric whose family object is gone: keep every family for the model's life
        #: (a fused model's steps share one set: one family per name in a process).
        self._families: dict[str, Any] = {} if families is None else families

        def metric(name: str, description: str, kind: Any, buckets: list[float] | None = None, **labels: str):
            if name not in self._families:
                self._families[name] = family(name=name, description=description, kind=kind)
            created = self._families[name]
            if buckets is None:
                return created.Metric(labels={**self._labels, **labels})
            return created.Metric(labels={**self._labels, **labels}, buckets=buckets)

        self._metric = metric
        self._counter = family.COUNTER
        self._requests = metric("toolkit_hook_requests_total", "Requests handed to the toolkit hook",
                                family.COUNTER)
        self._api_entry = metric("toolkit_hook_api_entry_duration_seconds", "Time of the hook's api_entry, "
                                 "per request", family.HISTOGRAM, LATENCY_BUCKETS)
        self._infer = metric("toolkit_hook_infer_duration_seconds", "Time of the hook's infer, per call",
                             family.HISTOGRAM, LATENCY_BUCKETS)
        self._rows = metric("toolkit_hook_batch_rows", "Rows per infer call of the toolkit hook",
                            family.HISTOGRAM, [float(b) for b in ROW_BUCKETS])
        self._failures: dict[int, Any] = {}
        self._samples: list[tuple[Any, float]] = []

    def api_entry(self, seconds: float) -> None:
        self._samples.append((self._api_entry, seconds))

    def infer(self, rows: int, seconds: float) -> None:
        self._samples.append((self._infer, seconds))
        self._samples.append((self._rows, float(rows)))

    def flush(self, results: list) -> None:
        """Hand what one ``execute`` collected to the sender thread; never fails the requests it measured."""
        samples, self._samples = self._samples, []
        codes: dict[int, int] = {}
        for result in results:
            if isinstance(result, Failure):
                codes[result.code] = codes.get(result.code, 0) + 1
        _SENDER.submit(lambda: self._send(len(results), codes, samples))

    def _send(self, requests: int, codes: dict[int, int], samples: list[tuple[Any, float]]) -> None:
        try:
            self._requests.increment(requests)
            for code, count in codes.items():
                if code not in self._failures:
                    self._failures[code] = self._metric(
                        "toolkit_hook_failures_total", "Requests the toolkit hook answered with an error, by code",
                        self._counter, code=str(code))
                self._failures[code].increment(count)
            for histogram, value in samples:
                histogram.observe(value)
        except Exception as e:  # metrics are best effort: an answer must never fail because of them
            if self._log is not None and not self._warned:
                self._warned = True
                self._log(f"hook metrics not sent: {type(e).__name__}: {e}")
