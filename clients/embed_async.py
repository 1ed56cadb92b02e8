"""Embed many texts concurrently with tritonclient's asyncio clients (HTTP or gRPC).

Concurrent requests are what Triton's dynamic batcher turns into batches.
"""

import argparse
import asyncio
import sys

try:
    import numpy as np
    from tritonclient.utils import InferenceServerException
except ImportError as e:
    sys.exit(f"Error: {e.name} is not installed in this Python: run `source .venv/bin/activate` first")


async def embed(client, module, text: str) -> np.ndarray:
    data = np.array([[text.encode("utf-8")]], dtype=object)
    text_input = module.InferInput("TEXT", [1, 1], "BYTES")
    text_input.set_data_from_numpy(data)
    result = await client.infer("embedding", [text_input])
    return result.as_numpy("EMBEDDING")[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("texts", nargs="+")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    if args.protocol == "grpc":
        import tritonclient.grpc.aio as module
    else:
        import tritonclient.http.aio as module
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    client = module.InferenceServerClient(url)
    try:
        vectors = await asyncio.gather(*(embed(client, module, t) for t in args.texts))
    except InferenceServerException as e:
        sys.exit(f"Error: {url}: {e.message()} (is `toolkit serve` running, and is this its {args.protocol} port?)")
    except OSError as e:  # aiohttp's connection errors derive from OSError
        sys.exit(f"Error: cannot reach Triton at {url} ({e.strerror or e}): is `toolkit serve` running?")
    finally:
        await client.close()
    for text, vector in zip(args.texts, vectors, strict=True):
        print(f"{args.protocol:<5} {text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}")


if __name__ == "__main__":
    asyncio.run(main())
