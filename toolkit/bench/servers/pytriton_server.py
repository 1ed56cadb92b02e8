"""Baseline (c): PyTriton serving the same pipeline with ``@batch``, the closest anchor tool.

    python -m toolkit.bench.servers.pytriton_server --workload embedding --model-dir model_repository/bert/1 \\
        --http-port 8000 --grpc-port 8001 --metrics-port 8002 [--max-batch-size 64] [--max-queue-delay-us 2000]

Prints ``READY http=<port> grpc=<port>`` on stdout once the model answers. Triton's own log goes to
stdout as well (PyTriton echoes it) unless ``--log-file`` is given, so a parent reading stdout for
READY keeps draining it or passes ``--log-file``.

The served model has the model name, tensor names, dtypes and shapes of the toolkit's ensembles, so
one tritonclient call works against both:

    embedding   TEXT  BYTES [n, 1] -> EMBEDDING FP32 [n, 384]
    mobile      IMAGE BYTES [n, 1] -> EMBEDDING FP32 [n, 1280]

What differs from the toolkit is where the Python runs: PyTriton's python-backend model is a proxy
that hands each dynamic batch over ZeroMQ and shared memory to this process, where the ``@batch``
function runs the whole pipeline (tokenizer or image decoding, onnxruntime, pooling) in one call.
Consequences the benchmark should know:
- one model instance, so batches run one after another; onnxruntime keeps the pipeline's default
  intra-op threads (all cores), as for the naive baseline and the in-process limit;
- a text or image the pipeline rejects fails its whole dynamic batch (PyTriton returns the exception
  to every request of the batch); the toolkit's adapter fails only the bad request;
- Triton's statistics endpoint is left open (PyTriton protects it with a generated token by default)
  so the benchmark can read execution vs inference counts, as it does on the toolkit's server.

Starting here needed one thing PyTriton does not do itself (see ``use_this_interpreters_libpython``):
the python stub must load the libpython of the interpreter running this script. Everything else it
handles: it copies the server and the stub for this Python version into its workspace, puts this
environment's bin/ first on PATH for the stub, and removes the workspace on stop.

SIGTERM takes SIGINT's path: PyTriton's ``serve()`` catches KeyboardInterrupt and stops Triton (SIGINT
to tritonserver, which drains in-flight requests), then this process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import DEFAULT_PROTECTED_ENDPOINTS, Triton, TritonConfig, TritonSecurityConfig

from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline

LOGGER = logging.getLogger("toolkit.bench.pytriton")
#: workload -> (input tensor, embedding width): the toolkit's ensembles' interface.
WORKLOADS = {"embedding": ("TEXT", 384), "mobile": ("IMAGE", 1280)}


def use_this_interpreters_libpython() -> Path | None:
    """Make the python stub load the libpython of the interpreter running this script.

    The stub links ``libpython3.X.so.1.0`` by soname, so the loader takes the system's copy (Debian's
    3.11.2 here) while the stub imports the standard library of the interpreter found on PATH (this
    virtualenv's, pyenv 3.11.7). The toolkit's own adapter happens to survive that mismatch; PyTriton's
    proxy does not: it starts a multiprocessing manager, whose 3.11.7 ``resource_tracker`` calls
    ``RLock._recursion_count`` (added in 3.11.6), which the 3.11.2 C library lacks, and the model fails
    to load (the error of pytriton issue #51). Putting this interpreter's LIBDIR first on LD_LIBRARY_PATH, which
    PyTriton passes on to tritonserver and so to the stub, makes library and stdlib agree. The stub's
    RPATH names only PyTriton's own libs folder, so LD_LIBRARY_PATH is consulted before the system dirs.

    Returns the library used, or None when this interpreter has no shared libpython of its own (a static
    build: the stub then uses the system's, which must be the same patch release).
    """
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if not (sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname):
        return None
    library = Path(libdir) / soname
    if not library.is_file():
        return None
    paths = [libdir, *(p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir)]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
    return library


def make_infer_func(workload: str, model_dir: Path) -> Callable:
    """The ``@batch`` function: the whole dynamic batch through the pipeline in one call.

    ``@batch`` passes each input tensor as the keyword named like it, hence the upper-case parameters.
    """
    if workload == "embedding":
        pipeline = EmbeddingPipeline(model_dir)

        @batch
        def infer_embedding(TEXT: np.ndarray) -> dict[str, np.ndarray]:
            return {"EMBEDDING": pipeline([row[0].decode("utf-8") for row in TEXT])}

        return infer_embedding
    pipeline = MobilePipeline(model_dir)

    @batch
    def infer_mobile(IMAGE: np.ndarray) -> dict[str, np.ndarray]:
        return {"EMBEDDING": pipeline([row[0] for row in IMAGE])}

    return infer_mobile


def model_ready(host: str, http_port: int, model: str) -> bool:
    """PyTriton only logs a warning when a model does not come up; READY must mean it answers."""
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{http_port}/v2/models/{model}/ready"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="version folder with model.onnx")
    parser.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--log-file", type=Path, help="Triton's log goes here instead of stdout")
    args = parser.parse_args(argv)
    if not (args.model_dir / "model.onnx").is_file():
        parser.error(f"no model.onnx in {args.model_dir}")
    if args.max_batch_size < 1 or args.max_queue_delay_us < 0:
        parser.error("--max-batch-size must be >= 1 and --max-queue-delay-us >= 0")
    return args


_signal_received: str | None = None


class Stop(KeyboardInterrupt):
    """Raised by the SIGTERM/SIGINT handler; PyTriton's ``serve()`` treats it as Ctrl-C and stops Triton."""


def _stop_on_signal(signum: int, frame) -> None:
    global _signal_received
    _signal_received = signal.Signals(signum).name
    for other in (signal.SIGTERM, signal.SIGINT):  # once: a second signal must not interrupt the drain
        signal.signal(other, signal.SIG_IGN)
    raise Stop(_signal_received)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    library = use_this_interpreters_libpython()  # before Triton starts: PyTriton copies os.environ then
    LOGGER.info("python stub will load %s", library or "the system libpython")
    input_name, width = WORKLOADS[args.workload]
    config = TritonConfig(http_address=args.host, http_port=args.http_port, grpc_address=args.host,
                          grpc_port=args.grpc_port, metrics_address=args.host, metrics_port=args.metrics_port,
                          log_file=args.log_file)
    security = TritonSecurityConfig(restricted_endpoints=[e for e in DEFAULT_PROTECTED_ENDPOINTS if e != "statistics"])
    signal.signal(signal.SIGTERM, _stop_on_signal)
    signal.signal(signal.SIGINT, _stop_on_signal)
    triton = Triton(config=config, security_config=security)
    try:
        triton.bind(model_name=args.workload, infer_func=make_infer_func(args.workload, args.model_dir.resolve()),
                    inputs=[Tensor(name=input_name, dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="EMBEDDING", dtype=np.float32, shape=(width,))],
                    config=ModelConfig(max_batch_size=args.max_batch_size,
                                       batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
                    strict=True)
        triton.run()  # start tritonserver, load the model, wait for it
        if not model_ready(args.host, args.http_port, args.workload):
            LOGGER.error("model %r did not become ready; see Triton's log", args.workload)
            return 1
        sys.stdout.write(f"READY http={args.http_port} grpc={args.grpc_port}\n")
        sys.stdout.flush()
        triton.serve()  # blocks until a signal (caught inside as KeyboardInterrupt) or tritonserver's death
    except Stop:  # a signal during start-up, before serve() catches it itself
        pass
    finally:
        triton.stop()
    if _signal_received is None:
        LOGGER.error("tritonserver stopped on its own; see Triton's log")
        return 1
    LOGGER.info("stopped on %s", _signal_received)
    return 0


if __name__ == "__main__":
    sys.exit(main())
