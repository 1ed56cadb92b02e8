"""Call the REST gateway as go-infer's test client does: sign the envelope, POST /api/<path>.

    python clients/gateway_client.py embedding "Triton serves this sentence."
    python clients/gateway_client.py mobile photo.jpg --sign-type SM2

The body goes gzip-compressed and a gzip answer is accepted (the gateway does both); the answer
names its variant when the API is split between weighted variants (Endpoints in gateway.yaml).
"""

import argparse
import base64
import gzip
import json
import sys
import time
import urllib.error
import urllib.request

try:
    from toolkit.gateway.signing import canonical_string, sha256_signature, sm2_sign
except ImportError as e:
    sys.exit(f"Error: {e.name} is not installed in this Python: run `source .venv/bin/activate` first")

APP_ID, APP_SECRET = "3EA25569454745D01219080B779F021F", "41DF0E6AE27B5282C07EF5124642A352"  # gateway.yaml's demo
SM2_PRIVATE_KEY = "JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U="  # demo key: a real client keeps its own

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("api", choices=["embedding", "mobile"])
parser.add_argument("value", help="the text (embedding) or an image file (mobile)")
parser.add_argument("--url", default="http://127.0.0.1:5000", metavar="URL",
                    help="the gateway: host:port or http://host:port, as `toolkit gateway` prints it "
                         "(default: %(default)s)")
parser.add_argument("--sign-type", choices=["SHA256", "SM2"], default="SHA256",
                    help="how to sign the request, as go-infer's clients do (default: %(default)s)")
args = parser.parse_args()
url = args.url.strip().rstrip("/")
if "://" not in url:
    url = f"http://{url}"  # host:port, as the gateway's address is usually written
elif not url.startswith(("http://", "https://")):
    parser.error(f"--url {args.url!r}: use host:port or http://host:port")

if args.api == "embedding":
    data = {"text": args.value}
else:
    try:
        with open(args.value, "rb") as f:
            data = {"image": base64.b64encode(f.read()).decode("ascii")}
    except OSError as e:
        sys.exit(f"Error: cannot read {args.value!r}: {e.strerror or e}")
body = {"appId": APP_ID, "version": "1", "signType": args.sign_type, "encType": "plain",
        "timestamp": int(time.time()), "data": data}
signing_string = canonical_string(body, APP_SECRET)
body["signData"] = (sha256_signature(signing_string) if args.sign_type == "SHA256"
                    else sm2_sign(signing_string, SM2_PRIVATE_KEY))

request = urllib.request.Request(f"{url}/api/{args.api}", data=gzip.compress(json.dumps(body).encode("utf-8")),
                                 headers={"Content-Type": "application/json", "Content-Encoding": "gzip",
                                          "Accept-Encoding": "gzip"}, method="POST")
started = time.perf_counter()
try:
    with urllib.request.urlopen(request, timeout=60) as response:
        raw = response.read()
        answer = json.loads(gzip.decompress(raw) if response.headers.get("Content-Encoding") == "gzip" else raw)
except urllib.error.HTTPError as e:  # the gateway answers its envelope with 4xx/5xx too
    try:
        raw = e.read()
        answer = json.loads(gzip.decompress(raw) if e.headers.get("Content-Encoding") == "gzip" else raw)
    except ValueError:
        sys.exit(f"Error: {url}: HTTP {e.code} {e.reason}")
except (OSError, ValueError) as e:
    reason = getattr(e, "reason", None) or e
    sys.exit(f"Error: cannot reach the gateway at {url} ({reason}): is `toolkit gateway` running?")
print(f"[{(time.perf_counter() - started) * 1000:.0f} ms] code {answer['code']}, {answer['data']['msg']}, "
      f"request {answer['data']['requestId']}" + (f", variant {answer['data']['variant']}"
                                                  if "variant" in answer["data"] else ""))
if not answer.get("success"):
    sys.exit(1)  # the line above names the code and message
vector = answer["data"]["embeddings"]
print(f"embeddings: dim {len(vector)}, first {[round(v, 4) for v in vector[:4]]}")
