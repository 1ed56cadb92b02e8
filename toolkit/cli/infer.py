"""``toolkit infer``: call a model on a running server and print its outputs as JSON (``toolkit.client``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolkit.errors import ToolkitError


@click.command()
@click.argument("model")
@click.option("-i", "--input", "inputs", multiple=True, metavar="NAME=JSON|@FILE",
              help="An input as JSON (e.g. TEXT='[\"hello\"]'), or @FILE for raw bytes (BYTES inputs).")
@click.option("--url", default=None,
              help="host:port (default 127.0.0.1:8000 for http, :8001 for grpc); with grpc, several "
                   "replicas as a,b,c or dns:///name:port, balanced by gRPC.")
@click.option("--protocol", type=click.Choice(["http", "grpc"]), default="http", show_default=True)
@click.option("--model-version", default="", help="A specific version (default: Triton's choice).")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds; also sent to Triton, which drops the request if it is still queued by then.")
@click.option("--compress", type=click.Choice(["gzip", "deflate"]), default=None,
              help="Compress the request and the answer (HTTP: gzip or deflate; gRPC: gzip).")
def infer(model: str, inputs: tuple[str, ...], url: str | None, protocol: str, model_version: str,
          timeout: float, compress: str | None) -> None:
    """Call MODEL (a model or an ensemble) and print its outputs as JSON.

    A batched model takes one item or a list of items: -i 'TEXT=["a","b"]' embeds two texts.
    """
    from toolkit.client import TritonClient, parse_input_value, to_jsonable

    url = url or ("127.0.0.1:8000" if protocol == "http" else "127.0.0.1:8001")
    files = {}
    for item in inputs:  # read @FILE inputs before connecting: a missing file is the user's mistake
        name, _, raw = item.partition("=")
        if raw.startswith("@"):
            try:
                files[item] = Path(raw[1:]).read_bytes()
            except OSError as e:
                raise ToolkitError(f"--input {name}: cannot read {raw[1:]!r}: {e.strerror or e}") from e
    with TritonClient(url, protocol=protocol, timeout=timeout, compression=compress) as client:  # type: ignore[arg-type]
        meta = {t["name"]: t for t in client.metadata(model)["inputs"]}
        arrays = {}
        for item in inputs:
            name, sep, raw = item.partition("=")
            if not sep or name not in meta:
                raise ToolkitError(f"--input {item!r}: expected NAME=VALUE with NAME one of {sorted(meta)}")
            shape = [int(d) for d in meta[name]["shape"]]
            if raw.startswith("@"):
                value = [files[item]]
            else:
                try:
                    value = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ToolkitError(f"--input {name}: not valid JSON ({e.msg}); quote strings: "
                                       f"-i '{name}=[\"hello\"]'") from e
            arrays[name] = parse_input_value(name, value, meta[name]["datatype"], shape)
        missing = [name for name in meta if name not in arrays]
        if missing:  # optional inputs (the config says which) may stay out
            optional = {i["name"] for i in client.config(model).get("input", []) if i.get("optional")}
            missing = [name for name in missing if name not in optional]
        if missing:
            described = ", ".join(f"{n} ({meta[n]['datatype']} {[int(d) for d in meta[n]['shape']]})"
                                  for n in missing)
            first = missing[0]
            example = f"'{first}=[\"hello\"]'" if meta[first]["datatype"] == "BYTES" else f"'{first}=[[0.5, 1]]'"
            raise ToolkitError(f"model '{model}' needs input{'s' if len(missing) > 1 else ''} {described}: "
                               f"pass {'each' if len(missing) > 1 else 'it'} with -i, e.g. -i {example}")
        result = client.infer(model, arrays, version=model_version)
    json.dump({k: to_jsonable(v) for k, v in result.items()}, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
