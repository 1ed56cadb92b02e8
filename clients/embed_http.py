"""Embed texts through the `embedding` ensemble over HTTP (tritonclient, synchronous).

    python clients/embed_http.py "Triton serves this sentence."      # `toolkit serve` running
"""

import argparse
import sys

try:
    import numpy as np
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
except ImportError as e:
    sys.exit(f"Error: {e.name} is not installed in this Python: run `source .venv/bin/activate` first")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("texts", nargs="+")
parser.add_argument("--url", default="127.0.0.1:8000", help="host:port of `toolkit serve`'s HTTP port")
args = parser.parse_args()
url = args.url.removeprefix("http://").split("/")[0]

try:
    client = httpclient.InferenceServerClient(url)
    texts = np.array([[t.encode("utf-8")] for t in args.texts], dtype=object)  # [n, 1] BYTES
    text_input = httpclient.InferInput("TEXT", list(texts.shape), "BYTES")
    text_input.set_data_from_numpy(texts, binary_data=True)
    result = client.infer("embedding", [text_input])
except InferenceServerException as e:
    sys.exit(f"Error: {url}: {e.message()}")
except OSError as e:  # connection refused, unknown host, ...
    sys.exit(f"Error: cannot reach Triton at {url} ({e.strerror or e}): is `toolkit serve` running?")
for text, vector in zip(args.texts, result.as_numpy("EMBEDDING"), strict=True):
    print(f"HTTP  {text!r}: dim {vector.size}, norm {np.linalg.norm(vector):.4f}, first {np.round(vector[:4], 4)}")
