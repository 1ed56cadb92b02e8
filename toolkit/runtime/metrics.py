"""Per-hook Prometheus metrics on Triton's own ``/metrics`` (Paddle Serving's ``regist_metric``).

The adapter registers them with the python backend's custom metrics API (``pb_utils.MetricFamily``),
labelled by model and version, so they appear on Triton's metrics port beside Triton's own:

    toolkit_hook_requests_total{model,version}            requests handed to the hook
    toolkit_hook_failures_total{model,version,code}       requests answered with an error, by code
    toolkit_hook_api_entry_duration_seconds{model,version}  histogram, one sample per request
    toolkit_hook_infer_duration_seconds{model,version}    histogram, one sample per infer call
    toolkit_hook_batch_rows{model,version}                histogram of rows per infer call

Every metric update is a message from the stub to tritonserver, so samples are collected in the
stub and sent once per ``execute`` (one dynamic batch): counters as one increment, histogram
samples as they came. This file is imported inside Triton's python stub: numpy-free, Python 3.10.
"""

from __future__ import annotations

from typing import Any

from toolkit.runtime.batching import Failure, Observer

LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
ROW_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


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
        """Send what one ``execute`` collected; never fails the requests it measured."""
        samples, self._samples = self._samples, []
        try:
            self._requests.increment(len(results))
            codes: dict[int, int] = {}
            for result in results:
                if isinstance(result, Failure):
                    codes[result.code] = codes.get(result.code, 0) + 1
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
