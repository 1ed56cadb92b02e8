"""Embed texts through the `embedding` ensemble over gRPC (tritonclient, synchronous).

    python clients/embed_grpc.py "Triton serves this sentence."      # `toolkit serve` running
"""

import argparse
import sys

try:
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException
except ImportError as e:
    sys.exit(f"Error: {e.name} is not installed in this Python: run `source .venv/bin/activate` first")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("texts", nargs="+")
parser.add_argument("--url", default="127.0.0.1:8001", help="host:port of `toolkit serve`'s gRPC port")
args = parser.parse_args()

try:
    client = grpcclient.InferenceServerClient(args.url)
    texts = np.array([[t.encode("utf-8")] for t in args.texts], dtype=object)  # [n, 1] BYTES
    text_input = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
    text_input.set_data_from_numpy(texts)
    result = client.infer("embedding", [text_input], client_timeout=60)
except InferenceServerException as e:
    sys.exit(f"Error: {args.url}: {e.message()} (is `toolkit serve` running, and is this its gRPC port?)")
for text, vector in zip(args.texts, result.as_numpy("EMBEDDING"), strict=True):
    print(f"gRPC  {text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}, first {np.round(vector[:4], 4)}")
