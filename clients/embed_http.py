"""Embed texts through the `embedding` ensemble over HTTP (tritonclient, synchronous)."""

import argparse

import numpy as np
import tritonclient.http as httpclient

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("texts", nargs="+")
parser.add_argument("--url", default="127.0.0.1:8000")
args = parser.parse_args()

client = httpclient.InferenceServerClient(args.url)
texts = np.array([[t.encode("utf-8")] for t in args.texts], dtype=object)  # [n, 1] BYTES
text_input = httpclient.InferInput("TEXT", list(texts.shape), "BYTES")
text_input.set_data_from_numpy(texts, binary_data=True)
result = client.infer("embedding", [text_input])
for text, vector in zip(args.texts, result.as_numpy("EMBEDDING"), strict=True):
    print(f"HTTP  {text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}, first {np.round(vector[:4], 4)}")
