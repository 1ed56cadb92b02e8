"""Embed texts on several Triton replicas at once, balanced by gRPC itself (round_robin + retries),
with the toolkit's client: `toolkit serve --replicas 3` prints the address list to pass here.

    python clients/embed_replicas.py --urls 127.0.0.1:8001,127.0.0.1:8004,127.0.0.1:8007 "a text" "another"
"""

import argparse
import sys

import numpy as np

from toolkit.client import TritonClient
from toolkit.errors import ToolkitError

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("texts", nargs="+")
parser.add_argument("--urls", default="127.0.0.1:8001", help="gRPC host:port list, comma-separated")
parser.add_argument("--compress", choices=["gzip"], default=None, help="compress requests and answers")
args = parser.parse_args()

try:
    # A 9996 (busy, or a replica restarting) is retried with backoff; the deadline travels to Triton.
    with TritonClient(args.urls, protocol="grpc", timeout=10, compression=args.compress) as client:
        texts = np.array([[t.encode("utf-8")] for t in args.texts], dtype=object)
        vectors = client.infer("embedding", {"TEXT": texts})["EMBEDDING"]
except ToolkitError as e:
    sys.exit(f"Error: {e}")
for text, vector in zip(args.texts, vectors, strict=True):
    print(f"{text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}, first {np.round(vector[:4], 4)}")
