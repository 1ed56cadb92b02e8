"""The hook metrics' sender thread (toolkit/runtime/metrics.py) with a stand-in for the python
backend's metric API: the answer's path only hands updates over; the thread sends them in order;
``drain`` sends what is left; a failing metric never fails a request and is reported once."""

from __future__ import annotations

import threading
from typing import ClassVar

from toolkit.runtime import metrics
from toolkit.runtime.batching import Failure


class _Family:
    COUNTER, HISTOGRAM = "counter", "histogram"

    def __init__(self, name, description, kind):
        self.name = name

    def Metric(self, labels, buckets=None):  # the python backend's spelling
        return _Metric(self.name, labels)


class _Metric:
    sent: ClassVar[list] = []
    gate = threading.Event()
    fail = False

    def __init__(self, name, labels):
        self.name, self.labels = name, labels

    def _send(self, op, value):
        _Metric.gate.wait(10)
        if _Metric.fail:
            raise RuntimeError("metrics are off")
        _Metric.sent.append((self.name, self.labels.get("code"), op, value))

    def increment(self, value):
        self._send("increment", value)

    def observe(self, value):
        self._send("observe", value)


class _PbUtils:
    MetricFamily = _Family


def _hook_metrics(log=None):
    _Metric.sent, _Metric.fail = [], False
    _Metric.gate.clear()
    return metrics.HookMetrics(_PbUtils, "bert", "1", log=log)


def test_flush_hands_over_without_waiting_and_drain_sends_everything_in_order():
    m = _hook_metrics()
    m.api_entry(0.001)
    m.infer(rows=2, seconds=0.004)
    m.flush([{"y": 1}, Failure(1301, "out of range", invalid_input=True)])  # returns although sending blocks
    assert _Metric.sent == []
    m.infer(rows=1, seconds=0.002)
    m.flush([{"y": 2}])
    _Metric.gate.set()
    metrics.drain()
    assert _Metric.sent == [
        ("toolkit_hook_requests_total", None, "increment", 2),
        ("toolkit_hook_failures_total", "1301", "increment", 1),
        ("toolkit_hook_api_entry_duration_seconds", None, "observe", 0.001),
        ("toolkit_hook_infer_duration_seconds", None, "observe", 0.004),
        ("toolkit_hook_batch_rows", None, "observe", 2.0),
        ("toolkit_hook_requests_total", None, "increment", 1),
        ("toolkit_hook_infer_duration_seconds", None, "observe", 0.002),
        ("toolkit_hook_batch_rows", None, "observe", 1.0),
    ]
    m.flush([{"y": 3}])  # a new thread after a drain
    metrics.drain()
    assert _Metric.sent[-1] == ("toolkit_hook_requests_total", None, "increment", 1)


def test_a_metric_that_cannot_be_sent_is_logged_once_and_fails_nothing():
    logged = []
    m = _hook_metrics(log=logged.append)
    _Metric.fail = True
    _Metric.gate.set()
    for _ in range(3):
        m.flush([{"y": 1}])
    metrics.drain()
    assert _Metric.sent == [] and logged == ["hook metrics not sent: RuntimeError: metrics are off"]
