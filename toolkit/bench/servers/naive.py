"""Baseline (b): the server a user writes instead of Triton. FastAPI + uvicorn, one request -> one run.

    python -m toolkit.bench.servers.naive --workload embedding --model-dir model_repository/bert/1 \\
        --host 127.0.0.1 --port 8080 [--workers 1]

    POST /embedding {"texts": ["...", ...]}        -> {"embeddings": [[384 floats], ...]}
    POST /mobile    {"images": ["<base64>", ...]}  -> {"embeddings": [[1280 floats], ...]}
    GET  /health    200 once the pipeline is loaded: the readiness signal (uvicorn binds its port
                    only after the lifespan has loaded the pipeline, so any answer means ready)

It is written the way a competent user writes it, because that is what the toolkit must beat: one
pipeline per process, created in the lifespan, and a plain ``def`` endpoint that FastAPI runs in its
threadpool, calling the pipeline once with that request's items, as go-infer's one-goroutine-per-
request dispatcher does. Nothing batches requests together: that absence is what is measured.

Deliberate choices:
- onnxruntime threads are the pipeline's default, intra-op = all cores, as a user leaves them. The
  threadpool's concurrent requests share that pool; ``--workers N`` starts N processes that each
  size theirs to all cores (oversubscribed, as a user who just adds workers gets).
- no access log: uvicorn's per-request line costs time and fills pipes; Triton logs no line per
  request either, so both sides are measured without logging.
- a request holds at most 64 items, the Triton side's max_batch_size.
- bad input never crashes: malformed JSON, a wrong shape or bad base64 get pydantic's 422; a text
  or image the pipeline rejects gets 400 with the pipeline's ``[code] message``.
- SIGTERM / SIGINT: uvicorn's own handlers stop accepting, finish in-flight requests and run the
  lifespan's shutdown; the process then exits 0 (see ``main``).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from pydantic import Base64Bytes, BaseModel, Field

from toolkit.bench.pipelines import EmbeddingPipeline, MobilePipeline
from toolkit.hooks import HookError

MAX_ITEMS = 64
PIPELINES = {"embedding": EmbeddingPipeline, "mobile": MobilePipeline}
# uvicorn's workers import the app by name, so the command line reaches them through the environment.
ENV_WORKLOAD, ENV_MODEL_DIR = "TOOLKIT_NAIVE_WORKLOAD", "TOOLKIT_NAIVE_MODEL_DIR"


class EmbeddingRequest(BaseModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_ITEMS)


class MobileRequest(BaseModel):
    images: list[Base64Bytes] = Field(min_length=1, max_length=MAX_ITEMS)


class EmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


def create_app(workload: str | None = None, model_dir: Path | None = None) -> FastAPI:
    workload = workload or os.environ[ENV_WORKLOAD]
    model_dir = Path(model_dir or os.environ[ENV_MODEL_DIR])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.pipeline = PIPELINES[workload](model_dir)
        yield
        del app.state.pipeline

    app = FastAPI(title=f"naive {workload}", lifespan=lifespan)

    def run(request: Request, items: list) -> EmbeddingsResponse:
        try:
            vectors = request.app.state.pipeline(items)
        except HookError as e:
            raise HTTPException(400, e.wire_message()) from None
        except UnicodeError as e:  # a lone surrogate ("\ud800") is valid JSON but not encodable text
            raise HTTPException(400, f"text is not valid Unicode: {e}") from None
        return EmbeddingsResponse(embeddings=vectors.tolist())

    if workload == "embedding":
        @app.post("/embedding")
        def embedding(body: EmbeddingRequest, request: Request) -> EmbeddingsResponse:
            return run(request, body.texts)
    else:
        @app.post("/mobile")
        def mobile(body: MobileRequest, request: Request) -> EmbeddingsResponse:
            return run(request, body.images)

    @app.get("/health")
    def health(request: Request) -> dict[str, str]:
        if getattr(request.app.state, "pipeline", None) is None:
            raise HTTPException(503, "pipeline not loaded")
        return {"status": "ready", "workload": workload}

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=sorted(PIPELINES), required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="version folder with model.onnx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not (args.model_dir / "model.onnx").is_file():
        parser.error(f"no model.onnx in {args.model_dir}")
    os.environ[ENV_WORKLOAD], os.environ[ENV_MODEL_DIR] = args.workload, str(args.model_dir.resolve())
    # After its graceful shutdown a single uvicorn process re-raises the signal it caught, to die of it
    # (status -15), having first restored the handlers found at start. These handlers turn that finished
    # shutdown into exit 0, which the benchmark runner (like a service manager) reads as a clean stop.
    for stop_signal in (signal.SIGTERM, signal.SIGINT):
        signal.signal(stop_signal, lambda *_: sys.exit(0))
    uvicorn.run("toolkit.bench.servers.naive:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers, access_log=False)


if __name__ == "__main__":
    main()
