"""The CLI's ``-i NAME=JSON`` values <-> numpy arrays of the model's dtype, and answers back to JSON."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from toolkit.errors import InferenceError


def to_bytes(array: np.ndarray) -> np.ndarray:
    """str items -> UTF-8 bytes, in an object array of the same shape (a BYTES tensor)."""
    flat = [v.encode("utf-8") if isinstance(v, str) else v for v in array.reshape(-1)]
    out = np.empty(len(flat), dtype=np.object_)
    out[:] = flat
    return out.reshape(array.shape)


_TRITON_TO_NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
                    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
                    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
                    "BYTES": np.object_}


def parse_input_value(name: str, value: Any, datatype: str, shape: list[int]) -> np.ndarray:
    """A JSON value for one input -> an array of the model's dtype, adding the batch axis if needed.

    ``shape`` is the model's metadata shape (with -1 for the batch axis when the model batches).
    """
    if datatype not in _TRITON_TO_NUMPY:
        raise InferenceError(f"input '{name}': unsupported datatype {datatype}")
    try:
        array = np.array(value, dtype=_TRITON_TO_NUMPY[datatype])
    except (TypeError, ValueError) as e:
        raise InferenceError(f"input '{name}': cannot convert {json.dumps(value)[:80]} to {datatype}: {e}") from e
    if datatype == "BYTES":
        array = to_bytes(array)
    batched = bool(shape) and shape[0] == -1
    if batched and array.ndim == len(shape) - 1:
        # One item (add the batch axis), or a list of items whose trailing dim is 1 (as the gateway
        # reads them): TEXT=["a","b"] for dims [1] is a batch of two.
        candidates = [array[np.newaxis, ...]]
        if shape[-1] == 1 and array.ndim >= 1:
            candidates.append(array[..., np.newaxis])
        array = next((c for c in candidates if _fits(c.shape, shape)), candidates[0])
    elif batched and array.ndim == 0 and all(d == 1 for d in shape[1:]):
        array = array.reshape([1] * len(shape))  # one scalar item: TEXT="hello"
    elif not batched and array.ndim == len(shape) - 1:
        array = array[np.newaxis, ...]
    if array.ndim != len(shape) or not _fits(array.shape, shape):
        raise InferenceError(f"input '{name}': got shape {list(array.shape)}, the model expects {shape} "
                             f"(-1 = any){_example(name, shape)}")
    return array


def _fits(actual: tuple[int, ...], expected: list[int]) -> bool:
    return len(actual) == len(expected) and all(e == -1 or a == e for a, e in zip(actual, expected, strict=True))


def _example(name: str, shape: list[int]) -> str:
    if shape and shape[0] == -1 and all(d == 1 for d in shape[1:]):
        return f"; give one item or a list of items, e.g. -i '{name}=[\"a\",\"b\"]' for a batch of two"
    return ""


def to_jsonable(array: np.ndarray) -> Any:
    if array.dtype == np.object_:
        return [to_jsonable(a) for a in array] if array.ndim else _decode(array.item())
    return array.tolist()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return value.hex()
    return value
