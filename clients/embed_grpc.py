"""Embed texts through the `embedding` ensemble over gRPC (tritonclient, synchronous)."""

import argparse

import numpy as np
import tritonclient.grpc as grpcclient

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("texts", nargs="+")
parser.add_argument("--url", default="127.0.0.1:8001")
args = parser.parse_args()

client = grpcclient.InferenceServerClient(args.url)
texts = np.array([[t.encode("utf-8")] for t in args.texts], dtype=object)  # [n, 1] BYTES
text_input = grpcclient.InferInput("TEXT", list(texts.shape), "BYTES")
text_input.set_data_from_numpy(texts)
result = client.infer("embedding", [text_input])
for text, vector in zip(args.texts, result.as_numpy("EMBEDDING"), strict=True):
    print(f"gRPC  {text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}, first {np.round(vector[:4], 4)}")
