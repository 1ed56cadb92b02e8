"""One dynamic batch through a hook: validate each request, stack, infer once, split back.

This is the adapter's logic without Triton's types, so it is unit-tested without a server:

1. ``api_entry`` runs per request; a request it rejects gets its own ``Failure`` and is left out.
2. Accepted requests are stacked along axis 0. Inputs named in ``pad_inputs`` are padded along their
   variable dims to the longest request; requests that still differ in shape run in separate groups.
3. ``infer`` runs once per group. Its outputs are checked against the config (names, row count,
   fixed dims, dtype) and split back per request; ``trim_outputs`` cut padded dims back.
4. If ``infer`` raises on a group of several requests, each request is retried alone, so a poison
   request fails by itself and its neighbours still get their answers.

Exactly one result (outputs or ``Failure``) is returned per request, in order.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from toolkit.runtime.codes import API_ENTRY_FAILED, INFERENCE_FAILED, format_coded_message
from toolkit.runtime.hooks import HookError
from toolkit.runtime.params import BUCKET_COST, BUCKET_ROWS, PAD_PREFIX, TRIM_PREFIX, config_parameters

_NUMPY_DTYPES = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
    "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
_MAX_MESSAGE = 500


@dataclass(frozen=True)
class TensorLayout:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # without the batch axis, as the hook sees them
    #: With a config ``reshape``: the dims Triton's clients and ensemble steps use (``dims`` is
    #: then the reshape: ``(1,)`` and ``()`` for one value per batch row); None: the same as ``dims``.
    api_dims: tuple[int, ...] | None = None

    @property
    def variable_axes(self) -> tuple[int, ...]:
        return tuple(i for i, d in enumerate(self.dims) if d == -1)


@dataclass(frozen=True)
class Layout:
    """What the adapter needs to know of a model's config."""

    max_batch_size: int
    inputs: Mapping[str, TensorLayout]
    outputs: Mapping[str, TensorLayout]
    pad: Mapping[str, float]
    trim: Mapping[str, str]
    #: The cost of one more ``infer`` call in padded elements per row (e.g. tokens); > 0 splits a
    #: padded batch into length buckets wherever a call costs less than the padding it saves.
    bucket_cost: float = 0.0
    #: Bucket the rows of a multi-row request one by one (``bucket_rows`` in the spec).
    bucket_rows: bool = False

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 0

    def input_from_api(self, name: str, array: np.ndarray) -> np.ndarray:
        """An input as the hook gets it from Triton, from the shape it travels in (``api_dims``):
        what Triton's ``reshape`` does to a request, for callers that bypass Triton (a fused step)."""
        spec = self.inputs.get(name)
        return array if spec is None or spec.api_dims is None else _reshape(array, spec.dims, self.batching)

    def output_to_api(self, name: str, array: np.ndarray) -> np.ndarray:
        """An output of the hook in the shape Triton sends it on (``api_dims``), as ``input_from_api``."""
        spec = self.outputs.get(name)
        return array if spec is None or spec.api_dims is None else _reshape(array, spec.api_dims, self.batching)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Layout:
        """Build from the model config JSON that Triton hands to ``initialize``."""

        def tensors(key: str) -> dict[str, TensorLayout]:
            return {t["name"]: TensorLayout(t["name"], np.dtype(_NUMPY_DTYPES[t["data_type"]]),
                                            tuple(int(d) for d in _model_dims(t)),
                                            tuple(int(d) for d in t["dims"]) if _reshaped(t) else None)
                    for t in config.get(key, [])}

        params = config_parameters(config)
        return cls(
            max_batch_size=int(config.get("max_batch_size", 0)),
            inputs=tensors("input"), outputs=tensors("output"),
            pad={k[len(PAD_PREFIX):]: float(v) for k, v in params.items() if k.startswith(PAD_PREFIX)},
            trim={k[len(TRIM_PREFIX):]: v for k, v in params.items() if k.startswith(TRIM_PREFIX)},
            bucket_cost=float(params.get(BUCKET_COST, 0)),
            bucket_rows=params.get(BUCKET_ROWS, "false") == "true",
        )


def _reshaped(tensor: Mapping[str, Any]) -> bool:
    return isinstance(tensor.get("reshape"), Mapping)


def _model_dims(tensor: Mapping[str, Any]) -> list:
    """The dims the model sees: a config ``reshape`` (``dims: [1]`` + ``reshape: { shape: [] }`` for
    one value per batch row) replaces the dims clients use. Triton reshapes a request's tensor to it
    before the model gets it and the model's output back to ``dims`` before the client gets it."""
    return list(tensor["reshape"].get("shape") or []) if _reshaped(tensor) else list(tensor["dims"])


def _reshape(array: np.ndarray, dims: tuple[int, ...], batching: bool) -> np.ndarray:
    return array.reshape(*array.shape[:1], *dims) if batching else array.reshape(dims)


@dataclass(frozen=True)
class Failure:
    """One request's error, as the client will see it. ``invalid_input``: the hook rejected the
    request on purpose (``HookError``): the caller's fault, sent as Triton's INVALID_ARG (HTTP 400,
    gRPC INVALID_ARGUMENT); otherwise the hook crashed: INTERNAL (HTTP 500)."""

    code: int
    message: str
    invalid_input: bool = False

    def wire_message(self) -> str:
        return format_coded_message(self.code, self.message)


Result = dict[str, np.ndarray] | Failure
Log = Callable[[str], None]


class Observer:
    """What ``run_batch`` reports as it goes (the adapter's metrics); does nothing by default."""

    def api_entry(self, seconds: float) -> None:
        """One request's ``api_entry`` took ``seconds``."""

    def infer(self, rows: int, seconds: float) -> None:
        """One ``infer`` call over ``rows`` rows took ``seconds`` (failed calls included)."""


_NO_OBSERVER = Observer()


@dataclass
class _Accepted:
    index: int
    inputs: dict[str, np.ndarray]
    rows: int
    row: int | None = None  # one row of a multi-row request, bucketed on its own (see _split_rows)


def run_batch(hook: Any, requests: list[dict[str, np.ndarray]], layout: Layout,
              log: Log | None = None, observer: Observer = _NO_OBSERVER) -> list[Result]:
    """Run one dynamic batch of requests through ``hook``; one result per request, in order."""
    results: list[Result | None] = [None] * len(requests)
    accepted: list[_Accepted] = []
    for i, request in enumerate(requests):
        started = time.perf_counter()
        try:
            normalised = hook.api_entry(request)
            accepted.append(_Accepted(i, normalised, _rows_of(normalised, layout)))
        except Exception as e:
            results[i] = _failure(e, API_ENTRY_FAILED, "api_entry", log)
        observer.api_entry(time.perf_counter() - started)
    items = _split_rows(accepted, layout)
    done: dict[tuple[int, int | None], Result] = {}
    for group in _groups(items, layout):
        _run_group(hook, group, layout, done, log, observer)
    for a in accepted:
        if (a.index, None) in done:
            results[a.index] = done[(a.index, None)]
        else:
            results[a.index] = _join_rows(a, [done[(a.index, r)] for r in range(a.rows)], layout)
    return results  # type: ignore[return-value]


def _split_rows(accepted: list[_Accepted], layout: Layout) -> list[_Accepted]:
    """With ``bucket_rows`` and length buckets on, the rows of a multi-row request (a bulk request of 64 texts) are
    bucketed one by one, each cut to its own length, instead of all at the request's longest.

    A row's length along the padded inputs' variable axis is where every padded input holds only
    its pad value from there on (the padding ``pad_inputs`` declares). Applies when every padded
    input has one variable axis and they agree on its size within the request; otherwise the
    request stays whole."""
    if not layout.bucket_rows or layout.bucket_cost <= 0 or not layout.pad or not layout.batching:
        return accepted
    items = []
    for a in accepted:
        lengths = _row_lengths(a, layout) if a.rows > 1 else None
        if lengths is None:
            items.append(a)
            continue
        for r, length in enumerate(lengths):
            inputs = {}
            for name, array in a.inputs.items():
                part = array[r:r + 1]
                if name in layout.pad and name in layout.inputs:
                    axis = layout.inputs[name].variable_axes[0] + 1
                    part = part[(slice(None),) * axis + (slice(0, length),)]
                inputs[name] = part
            items.append(_Accepted(a.index, inputs, 1, row=r))
    return items


def _row_lengths(a: _Accepted, layout: Layout) -> list[int] | None:
    padded = [n for n in layout.pad if n in a.inputs and n in layout.inputs]
    if not padded or any(len(layout.inputs[n].variable_axes) != 1 for n in padded):
        return None
    axes = {n: layout.inputs[n].variable_axes[0] + 1 for n in padded}
    if any(a.inputs[n].ndim <= axes[n] for n in padded) or len({a.inputs[n].shape[axes[n]] for n in padded}) != 1:
        return None
    lengths = np.ones(a.rows, dtype=np.int64)
    for name in padded:
        array, axis = a.inputs[name], axes[name]
        used = array != np.asarray(layout.pad[name], dtype=array.dtype)
        used = used.any(axis=tuple(i for i in range(1, array.ndim) if i != axis)) if array.ndim > 2 else used
        last = np.where(used.any(axis=1), used.shape[1] - np.argmax(used[:, ::-1], axis=1), 1)
        lengths = np.maximum(lengths, last)
    return [int(n) for n in lengths]


def _join_rows(a: _Accepted, parts: list[Result], layout: Layout) -> Result:
    """One request's answer from its rows' answers: the rows stacked, each padded back (with zeros)
    to the length the request would have had; the first failing row fails the request."""
    failure = next((p for p in parts if isinstance(p, Failure)), None)
    if failure is not None:
        return failure
    out = {}
    for name, spec in layout.outputs.items():
        arrays = [p[name] for p in parts]  # type: ignore[index]
        shape = [max(x.shape[i] for x in arrays) for i in range(arrays[0].ndim)]
        like = layout.trim.get(name)
        if like is not None and like in a.inputs:
            for out_axis, in_axis in zip(spec.variable_axes, layout.inputs[like].variable_axes, strict=False):
                shape[out_axis + 1] = a.inputs[like].shape[in_axis + 1]
        shape[0] = a.rows
        fill = b"" if arrays[0].dtype == np.object_ else 0
        joined = np.full(shape, fill, dtype=arrays[0].dtype)
        for r, x in enumerate(arrays):
            joined[(slice(r, r + 1), *(slice(0, n) for n in x.shape[1:]))] = x
        out[name] = joined
    return out


def _rows_of(request: Any, layout: Layout) -> int:
    if not isinstance(request, dict) or not all(isinstance(v, np.ndarray) for v in request.values()):
        raise TypeError("api_entry must return a dict of numpy arrays")
    if not layout.batching:
        return 1
    rows = {name: (v.shape[0] if v.ndim else None) for name, v in request.items()}
    if None in rows.values() or len(set(rows.values())) > 1:
        raise ValueError(f"every tensor of a request needs the same batch size on axis 0, got {rows}")
    return next(iter(rows.values()), 0)


def _groups(accepted: list[_Accepted], layout: Layout) -> list[list[_Accepted]]:
    """Requests that can share one ``infer`` call: all of them, unless shapes force a split."""
    if not layout.batching:
        return [[a] for a in accepted]
    groups: dict[tuple, list[_Accepted]] = {}
    for a in accepted:
        key = []
        for name in sorted(a.inputs):
            array = a.inputs[name]
            shape: list[int | None] = list(array.shape[1:])
            if name in layout.pad and name in layout.inputs:
                for axis in layout.inputs[name].variable_axes:
                    if axis < len(shape):
                        shape[axis] = None
            key.append((name, array.dtype.str, tuple(shape)))
        groups.setdefault(tuple(key), []).append(a)
    if layout.bucket_cost <= 0 or not layout.pad:
        return list(groups.values())
    return [bucket for group in groups.values() for bucket in _buckets(group, layout)]


def _padded_size(a: _Accepted, layout: Layout) -> int:
    """How many elements per row the request's padded inputs have along their variable dims."""
    size = 1
    for name in layout.pad:
        if name in a.inputs and name in layout.inputs:
            shape = a.inputs[name].shape[1:]
            size = max(size, int(np.prod([shape[i] for i in layout.inputs[name].variable_axes if i < len(shape)])))
    return size


def _buckets(group: list[_Accepted], layout: Layout) -> list[list[_Accepted]]:
    """Split requests, sorted by length, into the buckets that minimise the padded work.

    cost(bucket) = bucket_cost + rows(bucket) * longest(bucket); an exact O(n^2) DP over the sorted
    requests (a dynamic batch holds at most max_batch_size requests, so n is small).
    """
    if len(group) < 2:
        return [group]
    ordered = sorted(group, key=lambda a: _padded_size(a, layout))
    sizes = [_padded_size(a, layout) for a in ordered]
    rows = np.cumsum([0] + [a.rows for a in ordered])
    best = [0.0] + [float("inf")] * len(ordered)
    cut = [0] * (len(ordered) + 1)
    for j in range(1, len(ordered) + 1):
        for i in range(j):
            cost = best[i] + layout.bucket_cost + (rows[j] - rows[i]) * sizes[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], len(ordered)
    while j > 0:
        buckets.append(ordered[cut[j]:j])
        j = cut[j]
    return buckets[::-1]


def _run_group(hook: Any, group: list[_Accepted], layout: Layout, results: dict, log: Log | None,
               observer: Observer = _NO_OBSERVER) -> None:
    try:
        if len(group) == 1:
            batch = group[0].inputs
        else:
            batch = {name: _stack([a.inputs[name] for a in group], layout.pad.get(name))
                     for name in group[0].inputs}
        started = time.perf_counter()
        try:
            outputs = hook.infer(batch)
        finally:
            observer.infer(sum(a.rows for a in group), time.perf_counter() - started)
        split = _split(outputs, group, layout)
    except Exception as e:
        if len(group) > 1:
            if log:
                log(f"infer failed on a batch of {len(group)} requests ({type(e).__name__}: {e}); "
                    "retrying each request alone to isolate the failing one")
            for a in group:
                _run_group(hook, [a], layout, results, log, observer)
            return
        results[(group[0].index, group[0].row)] = _failure(e, INFERENCE_FAILED, "infer", log)
        return
    for a, out in zip(group, split, strict=True):
        results[(a.index, a.row)] = out


def _stack(arrays: list[np.ndarray], pad: float | None) -> np.ndarray:
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) == 1 or pad is None:
        return np.concatenate(arrays, axis=0)
    target = tuple(max(s[i] for s in shapes) for i in range(arrays[0].ndim - 1))
    out = np.full((sum(a.shape[0] for a in arrays), *target), pad, dtype=arrays[0].dtype)
    start = 0
    for a in arrays:
        out[(slice(start, start + a.shape[0]), *(slice(0, n) for n in a.shape[1:]))] = a
        start += a.shape[0]
    return out


def _split(outputs: Any, group: list[_Accepted], layout: Layout) -> list[dict[str, np.ndarray]]:
    if not isinstance(outputs, Mapping):
        raise TypeError(f"infer must return a dict of outputs, got {type(outputs).__name__}")
    unknown = sorted(set(outputs) - set(layout.outputs))
    if unknown:
        raise ValueError(f"infer returned unknown outputs {unknown} (config outputs: {sorted(layout.outputs)})")
    total = sum(a.rows for a in group)
    per_request: list[dict[str, np.ndarray]] = [{} for _ in group]
    for name, spec in layout.outputs.items():
        if name not in outputs:
            raise ValueError(f"infer returned no output '{name}'")
        array = _as_dtype(np.asarray(outputs[name]), spec)
        batch_axes = 1 if layout.batching else 0
        if array.ndim != len(spec.dims) + batch_axes or any(
                d not in (-1, n) for d, n in zip(spec.dims, array.shape[batch_axes:], strict=True)):
            raise ValueError(f"output '{name}' has shape {list(array.shape)}, config dims are "
                             f"{list(spec.dims)}" + (" after the batch axis" if batch_axes else ""))
        if not layout.batching:
            per_request[0][name] = np.ascontiguousarray(array)
            continue
        if array.shape[0] != total:
            raise ValueError(f"output '{name}' has {array.shape[0]} rows for a batch of {total}")
        like = layout.trim.get(name)
        start = 0
        for out, a in zip(per_request, group, strict=True):
            part = array[start:start + a.rows]
            start += a.rows
            if like is not None and like in a.inputs:
                part = _trim(part, spec, a.inputs[like], layout.inputs[like])
            out[name] = np.ascontiguousarray(part)
    return per_request


def _trim(part: np.ndarray, spec: TensorLayout, source: np.ndarray, source_spec: TensorLayout) -> np.ndarray:
    """Cut the k-th variable dim of an output back to the request's k-th variable input dim."""
    index = [slice(None)] * part.ndim
    for out_axis, in_axis in zip(spec.variable_axes, source_spec.variable_axes, strict=False):
        index[out_axis + 1] = slice(0, source.shape[in_axis + 1])
    return part[tuple(index)]


def _as_dtype(array: np.ndarray, spec: TensorLayout) -> np.ndarray:
    if spec.dtype == np.object_:
        if array.dtype.kind == "U":
            return np.char.encode(array, "utf-8").astype(np.object_)
        return array.astype(np.object_, copy=False)
    return array.astype(spec.dtype, copy=False)


def _failure(error: Exception, default_code: int, stage: str, log: Log | None) -> Failure:
    if isinstance(error, HookError):
        return Failure(error.code, error.message, invalid_input=True)
    if log:
        log(f"{stage} raised {type(error).__name__}:\n{traceback.format_exc()}")
    message = f"{stage} failed: {type(error).__name__}: {error}"
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE - 3] + "..."
    return Failure(default_code, message)
