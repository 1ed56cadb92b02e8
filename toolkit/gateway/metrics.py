"""The gateway's own Prometheus metrics (``GET /metrics``, never under ``/api/``), beside Triton's.

    toolkit_gateway_requests_total{api,variant,code}       answers, by API path, variant and code
    toolkit_gateway_request_duration_seconds{api,variant}  latency histogram (whole request)
    toolkit_gateway_retries_total{api}                     inferences sent again after a 9996

``api`` is the configured path for known APIs and ``-`` for anything else, so a client cannot grow
the label set (and the server's memory) by inventing paths.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("toolkit_gateway_requests", "Gateway answers by API, variant and code",
                                ["api", "variant", "code"], registry=self.registry)
        self.latency = Histogram("toolkit_gateway_request_duration_seconds", "Gateway request latency",
                                 ["api", "variant"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.retries = Counter("toolkit_gateway_retries", "Inferences sent again after a retryable failure",
                               ["api"], registry=self.registry)

    def observe(self, api: str, variant: str, code: int, seconds: float) -> None:
        self.requests.labels(api, variant or "-", str(code)).inc()
        self.latency.labels(api, variant or "-").observe(seconds)

    def retried(self, api: str) -> None:
        self.retries.labels(api).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
