"""Which APIs exist (discovered from Triton) and how a request's JSON ``data`` becomes tensors.

Discovery: every READY model or ensemble whose config carries ``toolkit.api_path`` becomes
``POST /api/<api_path>``; an ``Apis`` entry in the settings can add or adjust one.

The default mapping, from the model's metadata, where the settings name nothing:
- each input tensor is read from the ``data`` field named after it in lower case
  (``TEXT`` -> ``data.text``, ``IMAGE`` -> ``data.image``);
- a BYTES input is ``text`` (a UTF-8 string), or ``base64`` (binary data, base64-encoded) when its
  lower-cased name is one of ``image img audio video file blob bytes binary`` or ends in
  ``_image``/``_bytes``; any other dtype is ``number``;
- each output tensor is written to the lower-cased, plural field (``EMBEDDING`` -> ``embeddings``).

One item or several: a field holding one item (``"text": "hi"``) is a batch of one and the outputs
come back as one item (``"embeddings": [0.1, ...]``), as go-infer answers; a list of items
(``"text": ["a", "b"]``) comes back as a list (``"embeddings": [[...], [...]]``). An item of a
tensor whose dims are ``[1]`` is a scalar. Every problem with ``data`` is a 9801 naming the field.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from toolkit.errors import GatewayError
from toolkit.gateway.envelope import RequestError
from toolkit.gateway.settings import ApiMapping, GatewaySettings, normalise_api_path

log = logging.getLogger("toolkit.gateway")

API_PATH_PARAMETER = "toolkit.api_path"
_BINARY_NAMES = {"image", "img", "audio", "video", "file", "blob", "bytes", "binary"}
_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
          "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_}


def default_kind(tensor: str, datatype: str) -> str:
    if datatype != "BYTES":
        return "number"
    name = tensor.lower()
    return "base64" if name in _BINARY_NAMES or name.endswith(("_image", "_bytes")) else "text"


def default_field(tensor: str) -> str:
    name = tensor.lower()
    return name if name.endswith("s") else name + "s"


@dataclass(frozen=True)
class InputField:
    field: str
    tensor: str
    kind: str
    datatype: str
    dims: tuple[int, ...]  # without the batch axis; -1 = any


@dataclass(frozen=True)
class OutputField:
    tensor: str
    field: str
    datatype: str
    dims: tuple[int, ...]  # without the batch axis


@dataclass(frozen=True)
class ApiRoute:
    path: str
    model: str
    inputs: tuple[InputField, ...]
    outputs: tuple[OutputField, ...]
    max_batch_size: int
    timeout: float
    #: The model version to call ("" = the one Triton's policy serves), and the endpoint variant
    #: this route is (Endpoints in the settings), if any.
    version: str = ""
    variant: str = ""

    def to_tensors(self, data: Mapping[str, Any], missing: int) -> tuple[dict[str, np.ndarray], bool]:
        """The request's tensors, and whether ``data`` held single items (not lists)."""
        arrays: dict[str, np.ndarray] = {}
        counts: dict[str, tuple[int, bool]] = {}
        batched = self.max_batch_size > 0
        for spec in self.inputs:
            if spec.field not in data:
                raise RequestError(missing, f"missing parameter: data.{spec.field}")
            array, single = _to_array(spec, data[spec.field], missing, batched=batched)
            arrays[spec.tensor] = array
            counts[spec.field] = (len(array) if batched else 1, single)
        if len(set(counts.values())) > 1:
            described = ", ".join(f"data.{f}: {'one item' if s else f'a list of {n}'}"
                                  for f, (n, s) in counts.items())
            raise RequestError(missing, f"fields disagree on the number of items ({described})")
        count, single = next(iter(counts.values()), (1, True))
        if batched and count > self.max_batch_size:
            raise RequestError(missing, f"{count} items: this API takes at most {self.max_batch_size} per request")
        return arrays, single

    def to_data(self, outputs: Mapping[str, np.ndarray], single: bool, failed: int) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for spec in self.outputs:
            array = np.asarray(outputs[spec.tensor])
            if spec.dims == (1,) and array.ndim and array.shape[-1] == 1:
                array = array[..., 0]  # an item of dims [1] is a scalar, as on the way in
            if self.max_batch_size > 0 and single:
                array = array[0]
            data[spec.field] = _to_json(array, spec, failed)
        return data


def _nested_depth(value: Any) -> int:
    depth = 0
    while isinstance(value, list):
        depth += 1
        if not value:
            break
        value = value[0]
    return depth


def _to_array(spec: InputField, value: Any, missing: int, *, batched: bool) -> tuple[np.ndarray, bool]:
    """``[n, *dims]`` (``dims`` alone for a model without a batch axis) from one item or a list."""
    where = f"data.{spec.field}"
    item_dims = () if spec.dims == (1,) else spec.dims
    depth = _nested_depth(value)
    if depth == len(item_dims):
        single, items = True, [value]
    elif batched and depth == len(item_dims) + 1:
        single, items = False, value
    else:
        raise RequestError(missing, f"{where}: {_expected(spec, batched)}")
    if not items:
        raise RequestError(missing, f"{where}: empty list")
    try:
        if spec.kind == "number":
            array = _numbers(items, spec)
        else:
            array = np.array(_bytes_tree(items, spec.kind, where, missing), dtype=object)
    except (ValueError, TypeError) as e:
        raise RequestError(missing, f"{where}: {_expected(spec, batched)}") from e
    shape = array.shape[1:]
    if len(shape) != len(item_dims) or any(d not in (-1, s) for d, s in zip(item_dims, shape, strict=True)):
        raise RequestError(missing, f"{where}: {_expected(spec, batched)}")
    if spec.dims == (1,):
        array = array.reshape(len(items), 1)
    return (array if batched else array[0]), single


def _bytes_tree(value: Any, kind: str, where: str, missing: int) -> Any:
    if isinstance(value, list):
        return [_bytes_tree(v, kind, where, missing) for v in value]
    if not isinstance(value, str):
        raise TypeError("not a string")
    if kind == "text":
        return value.encode("utf-8", "surrogatepass")
    try:  # go-infer's base64.StdEncoding, which skips line breaks
        return base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(missing, f"{where}: not valid base64") from None


def _numbers(items: list[Any], spec: InputField) -> np.ndarray:
    raw = np.array(items)
    if raw.dtype.kind not in "iuf" and not (raw.dtype.kind == "b" and spec.datatype == "BOOL"):
        raise ValueError("not numbers")
    array = raw.astype(_NUMPY[spec.datatype])
    if array.dtype.kind in "iub" and not np.array_equal(array, raw):
        raise ValueError(f"not representable as {spec.datatype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"out of range for {spec.datatype}")
    return array


def _expected(spec: InputField, batched: bool) -> str:
    """``a string``, ``a list of 2 numbers``, ``a 3x4 nested list of numbers`` (+ ``or a list of them``)."""
    plural = {"text": "strings", "base64": "base64 strings", "number": "numbers"}[spec.kind]
    if spec.dims == (1,):
        item = "a " + plural[:-1]
    elif len(spec.dims) == 1:
        item = f"a list of {'' if spec.dims[0] == -1 else f'{spec.dims[0]} '}{plural}"
    else:
        item = f"a {'x'.join('n' if d == -1 else str(d) for d in spec.dims)} nested list of {plural}"
    return f"expected {item}" + (" or a list of them" if batched else "")


def _to_json(array: np.ndarray, spec: OutputField, failed: int) -> Any:
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise RequestError(failed, f"inference failed: output {spec.tensor} holds NaN or infinity")
        if array.dtype != np.float64:  # a float32's shortest spelling, as Go writes a float32
            array = array.astype(str).astype(np.float64)
        return array.tolist()
    if array.dtype == np.object_:
        return _bytes_to_json(array)
    return array.tolist()


def _bytes_to_json(array: np.ndarray) -> Any:
    if array.ndim:
        return [_bytes_to_json(a) for a in array]
    value = array.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(value).decode("ascii")
    return value


# --- discovery ---------------------------------------------------------------------------------

def build_route(path: str, model: str, config: Mapping[str, Any], metadata: Mapping[str, Any],
                mapping: ApiMapping | None, default_timeout: float) -> ApiRoute:
    """One API from a model's config and metadata (as tritonclient's ``as_json`` gives them)."""
    mapping = mapping or ApiMapping()
    batched = int(config.get("max_batch_size", 0) or 0)
    tensors = {t["name"]: t for t in metadata.get("inputs", [])}
    outputs_meta = {t["name"]: t for t in metadata.get("outputs", [])}

    def dims(tensor: Mapping[str, Any]) -> tuple[int, ...]:
        shape = tuple(int(d) for d in tensor.get("shape", []))
        return shape[1:] if batched else shape

    if mapping.inputs is None:
        wanted = {name.lower(): (name, None) for name in tensors}
        if len(wanted) != len(tensors):
            raise GatewayError(f"api '{path}': model '{model}' has inputs that differ only in case; "
                               f"map them in Apis.{path}.Inputs")
    else:
        wanted = {field: (m.tensor, m.kind) for field, m in mapping.inputs.items()}
    inputs = []
    for field, (tensor, kind) in wanted.items():
        if tensor not in tensors:
            raise GatewayError(f"api '{path}': model '{model}' has no input '{tensor}' "
                               f"(it has {sorted(tensors)})")
        datatype = tensors[tensor]["datatype"]
        kind = kind or default_kind(tensor, datatype)
        if (kind == "number") != (datatype != "BYTES"):
            raise GatewayError(f"api '{path}': input '{tensor}' is {datatype}, which kind {kind} cannot fill")
        inputs.append(InputField(field, tensor, kind, datatype, dims(tensors[tensor])))
    if len({i.tensor for i in inputs}) != len(inputs):
        raise GatewayError(f"api '{path}': two data fields map to the same input tensor")
    unmapped = sorted(set(tensors) - {i.tensor for i in inputs})
    if unmapped:
        raise GatewayError(f"api '{path}': model '{model}' inputs {unmapped} are not mapped from any data field")

    out_map = mapping.outputs if mapping.outputs is not None else {n: default_field(n) for n in outputs_meta}
    outputs = []
    for tensor, field in out_map.items():
        if tensor not in outputs_meta:
            raise GatewayError(f"api '{path}': model '{model}' has no output '{tensor}' "
                               f"(it has {sorted(outputs_meta)})")
        if field in ("msg", "requestId"):
            raise GatewayError(f"api '{path}': output field '{field}' is reserved by the envelope")
        outputs.append(OutputField(tensor, field, outputs_meta[tensor]["datatype"], dims(outputs_meta[tensor])))
    return ApiRoute(path, model, tuple(inputs), tuple(outputs), batched, mapping.timeout or default_timeout)


def _report_unreachable_replicas(url: str, timeout: float) -> None:
    """Several replicas: say once which cannot be reached now (gRPC keeps trying them and sends their
    share to the others meanwhile); all of them unreachable is an error."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from toolkit.client.balancing import split_addresses

    addresses = split_addresses(url)
    if len(addresses) < 2:
        return
    down = []
    for address in addresses:
        client = grpcclient.InferenceServerClient(address)
        try:
            client.is_server_live(client_timeout=min(timeout, 3.0))
        except InferenceServerException:
            down.append(address)
        finally:
            client.close()
    if len(down) == len(addresses):
        raise GatewayError(f"no Triton replica is reachable at {url} (gRPC)")
    if down:
        log.warning("Triton replica(s) %s not reachable now; gRPC retries them and balances over the others",
                    ", ".join(down))


def variant_key(path: str, variant: str) -> str:
    """Where a variant's route is kept among the routes (never a valid API path: it has a NUL)."""
    return f"{path}\0{variant}"


def admin_headers(settings: GatewaySettings) -> dict[str, str] | None:
    """The gRPC metadata Triton expects for a restricted protocol: ``triton-grpc-protocol-<key>``."""
    if settings.triton.admin_header is None:
        return None
    key, _, value = settings.triton.admin_header.get_secret_value().partition("=")
    return {f"triton-grpc-protocol-{key}": value}


def discover_routes(settings: GatewaySettings, url: str | None = None, *, timeout: float = 10.0) -> dict[str, ApiRoute]:
    """Ask Triton (gRPC) which models expose an ``api_path`` and build every API's route."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    url = url or settings.triton.url
    headers = admin_headers(settings)
    from toolkit.client.balancing import channel_args, grpc_target
    from toolkit.errors import ToolkitError

    try:
        client = grpcclient.InferenceServerClient(grpc_target(url), channel_args=channel_args(url))
    except InferenceServerException as e:
        raise GatewayError(f"cannot connect to Triton at {url}: {e.message()}") from e
    except ToolkitError as e:
        raise GatewayError(f"Triton.Url: {e}") from e
    try:
        _report_unreachable_replicas(url, timeout)
        try:
            client.is_server_live(client_timeout=timeout)
        except InferenceServerException as e:
            raise GatewayError(f"Triton is not reachable at {url} (gRPC): {e.message()}") from e
        try:
            index = client.get_model_repository_index(headers=headers, as_json=True, client_timeout=timeout)
        except InferenceServerException as e:
            hint = " (restricted: set Triton.AdminHeader to the KEY=VALUE of --restrict-apis)" \
                if "restricted" in (e.message() or "") else ""
            raise GatewayError(f"cannot list Triton's models at {url}: {e.message()}{hint}") from e
        ready = sorted({m["name"] for m in index.get("models", []) if m.get("state") == "READY"})
        configs = {name: client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
                   for name in ready}
        claims: dict[str, list[str]] = {}
        for name, config in configs.items():
            declared = config.get("parameters", {}).get(API_PATH_PARAMETER, {}).get("string_value")
            if declared:
                claims.setdefault(normalise_api_path(declared), []).append(name)
        models: dict[str, str] = {}
        for path in sorted(set(claims) | set(settings.apis)):
            configured = settings.apis.get(path)
            if path in settings.endpoints:
                # Its variants name their models; the one model the path would have without them is
                # routed too (unused meanwhile), so a reload that removes the endpoint can apply.
                plain = configured.model if configured is not None and configured.model else (
                    claims[path][0] if len(claims.get(path, [])) == 1 else None)
                if plain in configs:
                    models[path] = plain
                continue
            if configured is not None and configured.model:
                models[path] = configured.model
            elif len(claims.get(path, [])) == 1:
                models[path] = claims[path][0]
            elif path in claims:
                raise GatewayError(f"api path '{path}' is claimed by models {', '.join(claims[path])}: "
                                   f"name one in the settings (Apis.{path}.Model)")
            else:
                raise GatewayError(f"api '{path}' in the settings has no Model and no READY model "
                                   f"declares api_path '{path}'")
        routes: dict[str, ApiRoute] = {}
        for path, endpoint in settings.endpoints.items():
            for variant in endpoint.variants:
                if variant.model not in configs:
                    raise GatewayError(f"endpoint '{path}': variant '{variant.name}' names model '{variant.model}', "
                                       f"which is not READY on Triton at {url} (ready: {', '.join(ready) or 'none'})")
                metadata = client.get_model_metadata(variant.model, as_json=True, client_timeout=timeout)
                route = build_route(path, variant.model, configs[variant.model], metadata, settings.apis.get(path),
                                    settings.triton.timeout)
                routes[variant_key(path, variant.name)] = replace(route, version=variant.version,
                                                                  variant=variant.name)
        for path, model in models.items():
            if model not in configs:
                raise GatewayError(f"api '{path}': model '{model}' is not READY on Triton at {url} "
                                   f"(ready: {', '.join(ready) or 'none'})")
            metadata = client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            routes[path] = build_route(path, model, configs[model], metadata, settings.apis.get(path),
                                       settings.triton.timeout)
    except InferenceServerException as e:
        raise GatewayError(f"Triton at {url} failed during API discovery: {e.message()}") from e
    finally:
        client.close()
    if not routes:
        raise GatewayError(f"Triton at {url} serves no model with a toolkit.api_path "
                           f"(ready: {', '.join(ready) or 'none'}); nothing to route")
    for route in routes.values():
        log.info("route POST /api/%s -> %s (%s -> %s)", route.path, route.model,
                 ", ".join(f"data.{i.field}:{i.kind}->{i.tensor}" for i in route.inputs),
                 ", ".join(f"{o.tensor}->data.{o.field}" for o in route.outputs))
    return routes
