"""The load generator: asyncio clients in a process of their own, closed loop or open loop.

Closed loop: ``concurrency`` workers each send a request, wait for its answer, send the next, as a
fixed pool of users would. Open loop: requests arrive as a Poisson process at ``rate`` per second,
whether or not earlier ones have finished, so queueing shows as latency (measured from each
request's scheduled arrival, not from when the client got round to sending it).

Only requests that complete inside the measurement window (after the warm-up) count. Every error is
counted and its first messages kept; nothing is dropped silently. ``run_point`` runs one point in a
fresh process so the client's Python work never shares a GIL with whatever launched it.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import multiprocessing
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

#: Keep an overloaded open-loop run from growing without bound on the client side.
MAX_OUTSTANDING = 1024


@dataclass(frozen=True)
class TargetSpec:
    """Where to send requests and how. ``kind``: triton-grpc | triton-http | json-http | openai-http."""

    kind: str
    url: str
    model: str
    input_name: str = "TEXT"
    output_name: str = "EMBEDDING"
    json_field: str = "texts"  # json-http: the request's list field
    timeout_s: float = 30.0


@dataclass(frozen=True)
class PointSpec:
    target: TargetSpec
    payloads: list[bytes]
    concurrency: int = 0  # closed loop when > 0
    rate: float = 0.0  # open loop (requests/s) when > 0
    warmup_s: float = 2.0
    measure_s: float = 10.0
    seed: int = 0
    items: int = 1  # payloads per request (> 1: bulk requests of consecutive payloads)
    #: FLOPs of each payload (toolkit/bench/roofline.py), or empty: served GFLOP/s are then 0.
    flops: tuple[float, ...] = ()

    def request(self, index: int) -> list[bytes]:
        start = index * self.items
        return [self.payloads[(start + k) % len(self.payloads)] for k in range(self.items)]

    def work(self, index: int) -> float:
        """The FLOPs of request ``index`` (its payloads' own, without padding)."""
        if not self.flops:
            return 0.0
        start = index * self.items
        return float(sum(self.flops[(start + k) % len(self.flops)] for k in range(self.items)))


@dataclass
class PointResult:
    concurrency: int
    rate: float
    window_s: float
    completed: int
    errors: int
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    #: Throughput in each fifth of the window, to judge stability.
    slices: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    items: int = 1  # payloads per request
    #: FLOPs per second of the requests completed in the window, in GFLOP/s (0 without PointSpec.flops).
    gflops: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.throughput * self.items

    @property
    def variation(self) -> float:
        """Coefficient of variation of the per-slice throughput (0 = perfectly steady)."""
        if len(self.slices) < 2 or np.mean(self.slices) == 0:
            return float("inf")
        return float(np.std(self.slices) / np.mean(self.slices))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "variation": self.variation, "items_per_s": self.items_per_s}


class _Client:
    """One connection (pool) to the target; ``call`` sends one payload and checks the answer."""

    def __init__(self, spec: TargetSpec):
        self.spec = spec

    async def __aenter__(self) -> _Client:
        kind = self.spec.kind
        if kind == "triton-grpc":
            import tritonclient.grpc.aio as module
        elif kind == "triton-http":
            import tritonclient.http.aio as module
        elif kind in ("json-http", "openai-http"):
            import aiohttp

            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.spec.timeout_s))
            return self
        else:
            raise ValueError(f"unknown target kind {kind!r}")
        self.module = module
        if kind == "triton-grpc":  # one replica, or several balanced by gRPC itself
            from toolkit.client.balancing import channel_args, grpc_target

            self.client = module.InferenceServerClient(grpc_target(self.spec.url),
                                                       channel_args=channel_args(self.spec.url))
        else:
            self.client = module.InferenceServerClient(self.spec.url)
        return self

    async def __aexit__(self, *exc) -> None:
        if self.spec.kind in ("json-http", "openai-http"):
            await self.session.close()
        else:
            await self.client.close()

    async def call(self, payloads: list[bytes]) -> None:
        spec, n = self.spec, len(payloads)
        if spec.kind == "json-http":
            values = [p.decode("utf-8") if spec.json_field == "texts" else base64.b64encode(p).decode()
                      for p in payloads]
            async with self.session.post(f"http://{spec.url}/{spec.model}", json={spec.json_field: values}) as r:
                body = await r.json(content_type=None)
                if r.status != 200 or len(body.get("embeddings", [])) != n:
                    raise RuntimeError(f"HTTP {r.status}: {str(body)[:200]}")
            return
        if spec.kind == "openai-http":  # an OpenAI-style embeddings API (the infinity peer)
            texts = [p.decode("utf-8") for p in payloads]
            async with self.session.post(f"http://{spec.url}/embeddings",
                                         json={"model": spec.model, "input": texts}) as r:
                body = await r.json(content_type=None)
                if r.status != 200 or len(body.get("data", [])) != n:
                    raise RuntimeError(f"HTTP {r.status}: {str(body)[:200]}")
            return
        data = np.empty((n, 1), dtype=np.object_)
        data[:, 0] = payloads
        item = self.module.InferInput(spec.input_name, [n, 1], "BYTES")
        if spec.kind == "triton-http":
            item.set_data_from_numpy(data, binary_data=True)
            result = await self.client.infer(spec.model, [item], timeout=int(spec.timeout_s * 1e6))
        else:
            item.set_data_from_numpy(data)
            result = await self.client.infer(spec.model, [item], client_timeout=spec.timeout_s)
        if result.as_numpy(spec.output_name).shape[0] != n:
            raise RuntimeError("answer has the wrong number of rows")


class _Recorder:
    """Completed requests as (completion time, latency) since the start, and every error."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples: list[tuple[float, float, float]] = []
        self.errors: list[str] = []

    async def send(self, client: _Client, payload: list[bytes], since: float, work: float = 0.0) -> None:
        """One request; latency counts from ``since`` (sent, or scheduled in an open loop); ``work``:
        its FLOPs, counted if it completes."""
        try:
            await client.call(payload)
        except Exception as e:
            self.errors.append(f"{time.perf_counter() - self.start:.3f} {type(e).__name__}: {e}"[:300])
            return
        done = time.perf_counter()
        self.samples.append((done - self.start, done - since, work))


async def _closed_loop(spec: PointSpec) -> _Recorder:
    record = _Recorder()
    end = record.start + spec.warmup_s + spec.measure_s
    counter = itertools.count()

    async def worker(client: _Client) -> None:
        while (now := time.perf_counter()) < end:
            index = next(counter)
            await record.send(client, spec.request(index), now, spec.work(index))

    async with _Client(spec.target) as client:
        await asyncio.gather(*(worker(client) for _ in range(spec.concurrency)))
    return record


async def _open_loop(spec: PointSpec) -> _Recorder:
    record = _Recorder()
    rng = random.Random(spec.seed)
    end = record.start + spec.warmup_s + spec.measure_s
    outstanding: set[asyncio.Task] = set()
    async with _Client(spec.target) as client:
        scheduled, i = record.start, 0
        while True:
            scheduled += rng.expovariate(spec.rate)
            if scheduled >= end:
                break
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(outstanding) >= MAX_OUTSTANDING:
                record.errors.append(f"{scheduled - record.start:.3f} client: more than {MAX_OUTSTANDING} "
                                     "requests outstanding")
                continue
            task = asyncio.create_task(record.send(client, spec.request(i), scheduled, spec.work(i)))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            i += 1
        if outstanding:
            await asyncio.wait(outstanding, timeout=spec.target.timeout_s)
    return record


def _summarise(spec: PointSpec, samples: list[tuple[float, float, float]], errors: list[str]) -> PointResult:
    lo, hi = spec.warmup_s, spec.warmup_s + spec.measure_s
    window = [(t, lat, work) for t, lat, work in samples if lo <= t < hi]
    latencies = np.array([lat for _, lat, _ in window]) * 1000 if window else np.array([np.nan])
    edges = np.linspace(lo, hi, 6)
    times = np.array([t for t, _, _ in window]) if window else np.array([])
    slices = [float(((times >= a) & (times < b)).sum() / (b - a)) for a, b in itertools.pairwise(edges)]
    return PointResult(
        concurrency=spec.concurrency, rate=spec.rate, window_s=spec.measure_s, completed=len(window),
        errors=len(errors), throughput=len(window) / spec.measure_s,
        p50_ms=float(np.percentile(latencies, 50)), p95_ms=float(np.percentile(latencies, 95)),
        p99_ms=float(np.percentile(latencies, 99)), mean_ms=float(np.mean(latencies)),
        slices=slices, error_samples=errors[:5], items=spec.items,
        gflops=sum(work for _, _, work in window) / spec.measure_s / 1e9)


def run_point_here(spec: PointSpec) -> PointResult:
    """Run one load point in this process (``run_point`` runs it in a fresh one)."""
    if (spec.concurrency > 0) == (spec.rate > 0):
        raise ValueError("give exactly one of concurrency (closed loop) or rate (open loop)")
    runner = _closed_loop if spec.concurrency > 0 else _open_loop
    record = asyncio.run(runner(spec))
    return _summarise(spec, record.samples, record.errors)


def run_point(spec: PointSpec) -> PointResult:
    """One load point in a fresh process, so the client does not share the caller's GIL."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_point_here, (spec,))
