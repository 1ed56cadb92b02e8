"""Compressed transport, measured (BENCHMARKS.md, "Compression"): bytes on the wire and latency for a
batch of 8 JPEG images through `mobile` and 16 sentences through `embedding`, over HTTP (binary
tensors) and gRPC, without and with gzip.

    .venv/bin/python benchmarks/compression.py [--calls 40]

Bytes: the request body tritonclient sends (HTTP: its own generate_request_body; gRPC: the protobuf
message) and the answer Triton sends back, each raw and gzip-compressed as the transport would.
Latency: the median of --calls calls through toolkit.client, after a warm-up.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.bench.pipelines import load_corpus, make_images  # noqa: E402
from toolkit.client import TritonClient  # noqa: E402
from toolkit.repository.generate import generate_repository  # noqa: E402
from toolkit.repository.project import load_project  # noqa: E402
from toolkit.server import TritonServer, free_ports  # noqa: E402


def http_bytes(model: str, name: str, batch: np.ndarray, output: str, url: str) -> tuple[int, int, int, int]:
    import tritonclient.http as httpclient

    item = httpclient.InferInput(name, list(batch.shape), "BYTES")
    item.set_data_from_numpy(batch, binary_data=True)
    requested = [httpclient.InferRequestedOutput(output, binary_data=True)]
    body, _ = httpclient.InferenceServerClient.generate_request_body([item], outputs=requested)
    client = httpclient.InferenceServerClient(url)
    result = client.infer(model, [item], outputs=requested)
    answer = result.as_numpy(output).tobytes()
    client.close()
    return len(body), len(gzip.compress(body)), len(answer), len(gzip.compress(answer))


def latency(url: str, protocol: str, compression: str | None, model: str, inputs: dict, calls: int) -> float:
    with TritonClient(url, protocol=protocol, compression=compression) as client:
        for _ in range(3):
            client.infer(model, inputs)
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            client.infer(model, inputs)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    repository = generate_repository(load_project(ROOT / "model_repository", ROOT / "ensembles"),
                                     ROOT / "build" / "bench" / "compression_repository").path
    images = np.array([[b] for b in make_images(8)], dtype=object)
    texts = np.array([[t.encode()] for t in load_corpus()[:16]], dtype=object)
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=ROOT / "build" / "bench" / "compression-triton.log") as server:
        print("| batch | request bytes (gzip) | answer bytes (gzip) | HTTP p50 plain / gzip | gRPC p50 plain / gzip |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, model, name, batch in (("8 JPEG images, mobile", "mobile", "IMAGE", images),
                                          ("16 sentences, embedding", "embedding", "TEXT", texts)):
            req, req_gz, ans, ans_gz = http_bytes(model, name, batch, "EMBEDDING", server.http_url)
            inputs = {name: batch}
            timing = [latency(url, proto, comp, model, inputs, args.calls)
                      for proto, url in (("http", server.http_url), ("grpc", server.grpc_url))
                      for comp in (None, "gzip")]
            print(f"| {label} | {req:,} ({req_gz:,}, {req_gz / req:.0%}) | {ans:,} ({ans_gz:,}, {ans_gz / ans:.0%}) "
                  f"| {timing[0]:.1f} / {timing[1]:.1f} ms | {timing[2]:.1f} / {timing[3]:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
