"""Peer server: Ray Serve (FastAPI ingress, ``@serve.batch``) on the same ONNX files, loopback only.

Runs in its own venv (requirements-ray.txt); imports nothing from ``toolkit``. The models are
peer_models.py's, the same code the mosec peer runs.

    python ray_server.py --workload embedding --model-dir model_repository/bert/1 \\
        --port 9400 --ray-ports 9430-9469 [--max-batch-size 16] [--batch-wait-ms 5]

    POST /embedding {"texts": ["...", ...]}        -> {"embeddings": [[384 floats], ...]}
    POST /mobile    {"images": ["<base64>", ...]}  -> {"embeddings": [[1280 floats], ...]}
    GET  /health    200 once the replica has loaded its models

Written the way a competent Ray Serve user writes it: one deployment with a FastAPI ingress, one
replica (this machine has 2 cores, and onnxruntime uses both), ``max_ongoing_requests`` 128 instead
of Serve's default 5 (with 5, 16 clients would queue in the proxy and no batch would ever fill), and
``@serve.batch`` per workload: the calls of up to ``max_batch_size`` requests (or what arrived within
``batch_wait_timeout_s``) are flattened, run through the model in chunks of at most 64 items, and
split back per request. The model runs in a thread (``asyncio.to_thread``) so the replica's event
loop keeps accepting requests, and filling the next batch, while a batch computes.

Tuning: ``max_batch_size`` 16 and a 5 ms wait. One quick closed-loop measurement (1-text requests,
5 s per point, another job sharing the CPU): 16 / 5 ms gave 44 req/s (p99 45 ms) at 1 client and
86 req/s (p50 176 ms, p99 372 ms) at 16. The 32 / 5 ms run was void (it started while the previous
head was still draining its ports); the benchmark's closed loop never has more than 16 requests
outstanding, so a cap above 16 could not fill anyway, as measured with mosec.

Loopback only. Ray is built for clusters and by default reaches for the machine's routable address
and all interfaces; this script closes every door it found open (each one checked with ``ss``):
- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` makes Ray take 127.0.0.1 as the node address
  (``_node_ip_address="127.0.0.1"`` alone is replaced by the routable address, on purpose, by
  ``services.resolve_ip_for_localhost``); with node address 127.0.0.1 the C++ gRPC servers (GCS,
  raylet, object manager, core workers) and the agents bind 127.0.0.1 only.
- Serve's replica starts an inter-deployment gRPC server on ``[::]:0`` (hard-coded in
  ``ray.serve._private.replica`` as of 2.60). A ``worker_process_setup_hook`` rewrites that
  address to 127.0.0.1 in every worker process before any replica starts.
- The head runs as ``ray start --head --block`` with every port it opens given explicitly inside
  ``--ray-ports`` (GCS, node manager, object manager, agents, metrics, client server, worker ports),
  plus ``AUTOSCALER_METRIC_PORT`` / ``DASHBOARD_METRIC_PORT``; no dashboard, no usage stats.
- The Serve HTTP proxy binds ``http_options.host`` = 127.0.0.1.
The benchmark's launcher lists every socket of the process tree and refuses the peer otherwise.

SIGTERM / SIGINT: Serve and the Ray head are shut down, then the process exits 0.
"""

# No ``from __future__ import annotations``: Serve rebuilds the FastAPI routes inside the replica
# from the methods' annotations, and string annotations would not resolve there.
import argparse
import asyncio
import base64
import binascii
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import peer_models
from fastapi import FastAPI, HTTPException
from peer_models import MAX_ITEMS, ImageModel, TextModel, split
from pydantic import BaseModel, Field

ENV_GRPC_PORTS = "PEER_RAY_REPLICA_GRPC_PORTS"
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # node address = 127.0.0.1 (see the docstring)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_SERVE_ENABLE_HA_PROXY": "0",  # HAProxy mode would force Serve's HTTP ports onto all interfaces
}


def _loopback_hook() -> None:
    """Runs in every Ray worker process: keep Serve's inter-deployment gRPC server on loopback."""
    import ray.serve._private.replica as replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "_loopback", False):
        return

    lo, hi = (int(p) for p in os.environ.get(ENV_GRPC_PORTS, "0-0").split("-"))

    def loopback(server, address: str):
        if not (address.startswith("[::]:") or address.startswith("0.0.0.0:")):
            return original(server, address)
        if address.rsplit(":", 1)[1] == "0":  # a port from the range kept for these servers
            for port in range(lo, hi + 1) if lo else ():
                try:
                    return original(server, f"127.0.0.1:{port}")
                except RuntimeError:  # taken by another replica
                    continue
        return original(server, "127.0.0.1:" + address.rsplit(":", 1)[1])

    loopback._loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = loopback


# ----------------------------------------------------------------------------- the deployment
# At module level: FastAPI resolves the endpoints' (string) annotations in this module's namespace.
class EmbeddingRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_ITEMS)


class MobileRequest(BaseModel):
    images: list[str] = Field(min_length=1, max_length=MAX_ITEMS)


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


def build_app(dirs: dict[str, Path], max_batch_size: int, batch_wait_s: float):
    from ray import serve

    app = FastAPI(title="ray serve peer")

    @serve.deployment(max_ongoing_requests=128, num_replicas=1, ray_actor_options={"num_cpus": 1})
    @serve.ingress(app)
    class Peer:
        def __init__(self) -> None:
            self.text = TextModel(dirs["embedding"]) if "embedding" in dirs else None
            self.image = ImageModel(dirs["mobile"]) if "mobile" in dirs else None

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def embed_batch(self, requests: list[list[str]]) -> list:
            texts = [t for request in requests for t in request]
            rows = await asyncio.to_thread(self.text, texts)
            return split(rows, [len(r) for r in requests])

        @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_s)
        async def mobile_batch(self, requests: list) -> list:
            rows = await asyncio.to_thread(self.image, np.concatenate(requests))
            return split(rows, [len(r) for r in requests])

        @app.get("/health")
        def health(self) -> dict:
            return {"status": "ready", "workloads": sorted(dirs)}

        @app.post("/embedding")
        async def embedding(self, body: EmbeddingRequest) -> EmbeddingsResponse:
            if self.text is None:
                raise HTTPException(404, "embedding is not served")
            if any(not t.strip() for t in body.texts):
                raise HTTPException(422, "a text is empty")
            return EmbeddingsResponse(embeddings=(await self.embed_batch(body.texts)).tolist())

        @app.post("/mobile")
        async def mobile(self, body: MobileRequest) -> EmbeddingsResponse:
            if self.image is None:
                raise HTTPException(404, "mobile is not served")
            try:  # decode per request, so a broken image fails only its own request
                pixels = np.stack([ImageModel.pixels(base64.b64decode(i, validate=True)) for i in body.images])
            except (binascii.Error, ValueError, OSError) as e:
                raise HTTPException(422, f"not a decodable base64 image: {e}") from None
            return EmbeddingsResponse(embeddings=(await self.mobile_batch(pixels)).tolist())

    return Peer.bind()


# ----------------------------------------------------------------------------- the Ray head
def ray_ports(spec: str) -> dict[str, int]:
    """Every port the head opens, from a range ``LO-HI`` of at least 24 ports."""
    lo, hi = (int(p) for p in spec.split("-"))
    if hi - lo + 1 < 24:
        raise ValueError(f"--ray-ports {spec}: need at least 24 ports")
    names = ("gcs", "node_manager", "object_manager", "runtime_env_agent", "agent_grpc", "agent_listen",
             "metrics", "client_server", "autoscaler_metrics", "dashboard_metrics")
    ports = {name: lo + i for i, name in enumerate(names)}
    ports["min_worker"], ports["max_worker"] = lo + len(names), hi - 4
    ports["replica_grpc"] = hi - 3  # hi-3 .. hi: Serve replicas' inter-deployment gRPC servers
    return ports


def start_head(ports: dict[str, int], temp_dir: Path, num_cpus: int) -> subprocess.Popen:
    ray = Path(sys.executable).with_name("ray")
    cmd = [str(ray), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(ports["gcs"]), "--node-manager-port", str(ports["node_manager"]),
           "--object-manager-port", str(ports["object_manager"]),
           "--runtime-env-agent-port", str(ports["runtime_env_agent"]),
           "--dashboard-agent-grpc-port", str(ports["agent_grpc"]),
           "--dashboard-agent-listen-port", str(ports["agent_listen"]),
           "--metrics-export-port", str(ports["metrics"]),
           "--ray-client-server-port", str(ports["client_server"]),
           "--min-worker-port", str(ports["min_worker"]), "--max-worker-port", str(ports["max_worker"]),
           "--include-dashboard", "false", "--disable-usage-stats", "--num-cpus", str(num_cpus),
           "--temp-dir", str(temp_dir)]
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["embedding", "mobile", "both"], default="both")
    parser.add_argument("--model-dir", type=Path, help="the workload's version folder (one workload only)")
    parser.add_argument("--bert-dir", type=Path)
    parser.add_argument("--mobilenet-dir", type=Path)
    parser.add_argument("--port", type=int, required=True, help="Serve's HTTP port (on 127.0.0.1)")
    parser.add_argument("--ray-ports", required=True, help="LO-HI: the ports Ray's own processes may use")
    parser.add_argument("--temp-dir", type=Path, help="Ray's session folder (short: unix socket paths live "
                        "under it); default a new /tmp/rayp-*. Removed at exit.")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    workloads = ["embedding", "mobile"] if args.workload == "both" else [args.workload]
    given = {"embedding": args.bert_dir, "mobile": args.mobilenet_dir}
    if args.model_dir is not None:
        if len(workloads) != 1:
            parser.error("--model-dir needs one --workload")
        given[workloads[0]] = args.model_dir
    dirs = {}
    for name in workloads:
        if given[name] is None or not (given[name] / "model.onnx").is_file():
            parser.error(f"no model.onnx for {name}")
        dirs[name] = given[name].resolve()
    ports = ray_ports(args.ray_ports)
    os.environ.update(LOOPBACK_ENV)
    # Ray >= 2.5x turns token auth on and keeps a token in ~/.ray/auth_token; a fresh token per run,
    # handed to the head and the driver through the environment, keeps auth on and writes nothing to ~.
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["AUTOSCALER_METRIC_PORT"] = str(ports["autoscaler_metrics"])
    os.environ["DASHBOARD_METRIC_PORT"] = str(ports["dashboard_metrics"])
    os.environ[ENV_GRPC_PORTS] = f"{ports['replica_grpc']}-{ports['replica_grpc'] + 3}"
    # Short: Ray's unix socket paths live under it (108-byte limit).
    temp_dir = args.temp_dir or Path(tempfile.mkdtemp(prefix="rayp-"))
    temp_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    head = start_head(ports, temp_dir, len(os.sched_getaffinity(0)))
    try:
        import ray
        from ray import serve

        deadline = time.monotonic() + 120
        while True:  # the head is up once its GCS answers
            if head.poll() is not None:
                print(f"ray start exited with {head.returncode}", flush=True)
                return 1
            try:
                ray.init(address=f"127.0.0.1:{ports['gcs']}", _node_ip_address="127.0.0.1",
                         runtime_env={"worker_process_setup_hook": _loopback_hook},
                         log_to_driver=True, configure_logging=True)
                break
            except (ConnectionError, RuntimeError) as e:
                if time.monotonic() > deadline or stop.is_set():
                    print(f"cannot connect to the Ray head: {e}", flush=True)
                    return 1
                time.sleep(1)
        # The deployment class is pickled for the replica, whose worker cannot import this folder.
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(peer_models)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build_app(dirs, args.max_batch_size, args.batch_wait_ms / 1000), name="peer",
                  route_prefix="/")
        print(f"READY http://127.0.0.1:{args.port}/ {sorted(dirs)}", flush=True)
        while not stop.wait(1):
            if head.poll() is not None:
                print(f"the Ray head exited with {head.returncode}", flush=True)
                return 1
        return 0
    finally:
        import ray

        if ray.is_initialized():  # (serve.shutdown() on a driver that never connected would connect)
            try:
                from ray import serve

                serve.shutdown()
                ray.shutdown()
            except Exception as e:  # stopping anyway: report and go on
                print(f"shutdown: {type(e).__name__}: {e}", flush=True)
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
