"""The built-in hook that runs an ONNX file with onnxruntime: one ``run`` per dynamic batch.

The embedded tritonserver has only the python backend, so on that target every ``kind: onnx`` model
is this hook behind the fixed adapter.

Threads. The inter-op pool is 1 and the intra-op pool's threads sleep between ops. The intra-op size
(parameter ``intra_op_threads``):
- ``adaptive`` (the default): a run that no other instance of the model overlaps gets every core,
  any other run its share, ``cores // instance_count``. The instances see each other through
  ``ctx.occupancy`` (toolkit/runtime/occupancy.py); each instance holds one onnxruntime session of
  each size (a second copy of the weights: MiniLM-L6 +121 MB per instance, MobileNetV2 +11 MB), and
  both give the same bits. A lone request runs as fast as with every core; under load, the
  instances share the cores without oversubscribing them, which beats both fixed choices (BENCHMARKS.md,
  "Adaptive threads"). With one instance (or one core) there is one session of every core.
- a positive integer: that many threads, always (one session).
``spin_threads``: ``solo`` (the default) lets adaptive's every-core session spin within a run and
stop at its end, while the sessions that share the cores sleep between ops (a lone documentation
sentence through BERT: 6.8 -> 5.6-5.9 ms in process, the same CPU). ``"run"`` lets every session's
threads spin within a run (a lone convolutional net's batch-1 latency drops, MobileNetV2 27.8 -> 22.7
ms on a slow 2-core VM, but two instances then spin against each other: 56 -> 43 images/s at c=16),
``"true"`` always, ``"false"`` never.

Inputs are checked per request in ``api_entry`` (microseconds), so a bad one fails alone with a
clear code instead of onnxruntime's error (or, worse, a silently wrong answer: its Gather wraps a
negative index around):

    1301  an integer input holds a value outside its declared range (parameter
          ``input_range.<input>: "lo:hi"``, hi exclusive; e.g. ``input_ids: "0:30522"``). A BERT
          that ``toolkit export bert`` wrote declares its own from export.json: input_ids in
          [0, vocab_size), token_type_ids in [0, type_vocab_size), attention_mask in [0, 2).
    1302  a floating-point input holds NaN or infinity
    1303  a sequence input is longer than the model has positions (a BERT export: its
          max_position_embeddings, e.g. 512), which onnxruntime fails with a raw broadcast error
    1304  inputs disagree on a dimension the ONNX graph declares shared (the same symbolic name,
          e.g. BERT's ``sequence`` in input_ids and attention_mask): onnxruntime would fail the run
          with its own source paths, as INTERNAL
    1305  an input is empty along a dynamic axis (e.g. a sequence of length 0): no graph's answer
          for it means anything, and onnxruntime fails most (Gather, Reshape) as INTERNAL
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from toolkit.runtime.hooks import Hook, HookContext, HookError
from toolkit.runtime.params import SERVING_KEY, SOLO_SPIN, gpu_parameters, read_export, thread_parameters

INPUT_OUT_OF_RANGE = 1301
INPUT_NOT_FINITE = 1302
SEQUENCE_TOO_LONG = 1303
SHARED_DIM_MISMATCH = 1304
EMPTY_INPUT = 1305
RANGE_PREFIX = "input_range."
#: The level the served session uses unless export.json's serving entry (params.SERVING_KEY) says otherwise.
SERVED_LEVEL = "ORT_ENABLE_ALL"


def default_threads(instance_count: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, instance_count))


class OnnxModel(Hook):
    def init(self, ctx: HookContext) -> None:
        import onnxruntime as ort

        path = ctx.model_dir / ctx.parameters.get("onnx_file", "model.onnx")
        threads, spin = thread_parameters(ctx.parameters)
        share = default_threads(ctx.instance_count)
        export = read_export(ctx.model_dir)
        self.occupancy = ctx.occupancy
        self.solo = None  # adaptive: the session with every core, for runs no peer overlaps
        self.providers = execution_providers(ort, ctx)
        # solo (the default): only adaptive's every-core session spins, within a run no peer overlaps
        self.session = session(ort, path, threads or share, "false" if spin == SOLO_SPIN else spin,
                               export.get(SERVING_KEY), self.providers)
        self.providers = confirm_gpu(self.session, self.providers, ctx)
        if threads is None and default_threads(1) > share and ctx.occupancy.shared and self.on_cpu:
            self.solo = session(ort, path, default_threads(1), "run" if spin == SOLO_SPIN else spin,
                                export.get(SERVING_KEY))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dynamic_axes, self.shared_dims = _graph_dims(self.session.get_inputs())
        self.ranges = declared_ranges(export, ctx.parameters, self.input_names)
        #: input -> (its sequence axis, the most positions the model has)
        self.lengths = {k: v for k, v in _export_lengths(export).items() if k in self.input_names}

    @property
    def on_cpu(self) -> bool:
        return self.providers == ["CPUExecutionProvider"]

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_dims(request)
        for name, array in request.items():
            if name in self.lengths:
                axis, most = self.lengths[name]
                if array.ndim > axis and array.shape[axis] > most:
                    raise HookError(SEQUENCE_TOO_LONG, f"input {name!r} holds {array.shape[axis]} positions, more "
                                                       f"than the model's {most}: truncate it (the tokenizer's "
                                                       "max_seq_length)")
            if array.dtype.kind == "f":
                if not np.isfinite(array).all():
                    raise HookError(INPUT_NOT_FINITE, f"input {name!r} holds NaN or infinity")
            elif name in self.ranges and array.size:
                lo, hi = self.ranges[name]
                low, high = int(array.min()), int(array.max())
                if low < lo or high >= hi:
                    bad = low if low < lo else high
                    raise HookError(INPUT_OUT_OF_RANGE, f"input {name!r} holds {bad}, outside [{lo}, {hi})")
        return request

    def _check_dims(self, request: dict[str, np.ndarray]) -> None:
        for name, axes in self.dynamic_axes.items():
            array = request.get(name)
            if array is None:
                continue
            for axis, label in axes:
                if axis < array.ndim and array.shape[axis] == 0:
                    raise HookError(EMPTY_INPUT, f"input {name!r} is empty: 0 entries on its axis {axis} ({label})")
        for dim, places in self.shared_dims.items():
            seen = [(name, request[name].shape[axis]) for name, axis in places
                    if name in request and axis < request[name].ndim]
            if len({size for _, size in seen}) > 1:
                sizes = ", ".join(f"{name!r} {size}" for name, size in seen)
                raise HookError(SHARED_DIM_MISMATCH, f"inputs disagree on dimension {dim!r}, which the model "
                                                     f"shares between them: {sizes}")

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: batch[name] for name in self.input_names if name in batch}
        session = self.session
        if self.solo is not None and not self.occupancy.others_busy():
            session = self.solo
        return dict(zip(self.output_names, session.run(self.output_names, feed), strict=True))


def session(ort, path, threads: int = 0, spin: str = "false", serving: dict | None = None, providers=None):
    """The onnxruntime session this hook serves ``path`` with. ``serving`` is export.json's
    ``onnxruntime`` entry: what the export's check found the served path needs when onnxruntime's
    graph optimizer changes the model's outputs (``disabled_optimizers``: rewrite rules to skip, or
    a lower ``graph_optimization_level``); the export check runs the model through this same function."""
    serving = serving if isinstance(serving, dict) else {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                               str(serving.get("graph_optimization_level", SERVED_LEVEL)))
    # Spinning worker threads would burn the cores the other steps' processes, Triton and the
    # clients need between runs; in a multi-process server they must sleep instead.
    if spin == "run":  # spin between a run's ops, stop when it ends
        options.add_session_config_entry("session.force_spinning_stop", "1")
    elif spin != "true":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                providers=providers or ["CPUExecutionProvider"],
                                disabled_optimizers=list(serving.get("disabled_optimizers") or []) or None)


class GpuUnavailable(RuntimeError):
    """The model asks for a GPU that this onnxruntime cannot use (and allows no CPU fallback)."""


#: The onnxruntime backend's TensorRT keys (its README) -> the TensorRT provider's own option names.
_TRT_OPTIONS = {"max_workspace_size_bytes": "trt_max_workspace_size"}


def execution_providers(ort, ctx: HookContext, available: list[str] | None = None) -> list:
    """The providers for this instance's session: its device from ``gpu.devices`` (one entry per
    instance slot, written by gen-repo from the spec's instance_group), CUDA or TensorRT-then-CUDA as
    ``gpu.accelerator`` says, the CPU provider last (for ops a GPU provider lacks). When onnxruntime
    has no CUDA provider (no onnxruntime-gpu, or no usable GPU), the model fails to load, naming what
    is missing, unless the spec allows the CPU fallback."""
    placement = gpu_parameters(ctx.parameters)
    if placement is None:
        return ["CPUExecutionProvider"]
    devices, accelerator, options, fallback = placement
    device = devices[ctx.instance_index % len(devices)] if devices else "0"
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if available is None:
        preload = getattr(ort, "preload_dlls", None)  # onnxruntime-gpu: CUDA and cuDNN from their pip wheels
        if preload is not None:
            with contextlib.suppress(Exception):  # a system CUDA may still serve; the check below says if not
                preload()
        available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        if fallback:
            return ["CPUExecutionProvider"]
        raise GpuUnavailable(
            f"model '{ctx.model_name}' asks for GPU {device} (instance_group kind gpu) but onnxruntime "
            f"{getattr(ort, '__version__', '?')} has no CUDAExecutionProvider (providers: {', '.join(available)}): "
            "install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA GPU and driver, or set "
            "allow_cpu_fallback: true in its model.yaml")
    cuda = ("CUDAExecutionProvider", {"device_id": int(device)})
    if accelerator != "tensorrt":
        return [cuda, "CPUExecutionProvider"]
    if "TensorrtExecutionProvider" not in available:
        if not fallback:
            raise GpuUnavailable(f"model '{ctx.model_name}' asks for TensorRT (gpu_execution_accelerator) but "
                                 "onnxruntime has no TensorrtExecutionProvider: install TensorRT's libraries for "
                                 "onnxruntime-gpu, use name: cuda, or set allow_cpu_fallback: true")
        return [cuda, "CPUExecutionProvider"]
    trt: dict[str, object] = {"device_id": int(device)}
    for key, value in options.items():
        if key == "precision_mode":
            trt["trt_fp16_enable"] = value.upper() == "FP16"
        else:
            trt[_TRT_OPTIONS.get(key, key)] = value
    return [("TensorrtExecutionProvider", trt), cuda, "CPUExecutionProvider"]


def confirm_gpu(session, requested: list, ctx: HookContext) -> list:
    """The providers ``session`` really got. onnxruntime's python API falls back to the CPU with only a
    warning when a GPU provider fails to start (a missing CUDA library, no usable device): that is a
    load error here too, unless the spec allows the CPU fallback."""
    if requested == ["CPUExecutionProvider"]:
        return requested
    got = session.get_providers()
    if "CUDAExecutionProvider" in got or "TensorrtExecutionProvider" in got:
        return requested
    placement = gpu_parameters(ctx.parameters)
    if placement is not None and placement[3]:
        return ["CPUExecutionProvider"]
    raise GpuUnavailable(f"model '{ctx.model_name}' asks for a GPU, but onnxruntime started its session with "
                         f"{', '.join(got)} only (a CUDA or cuDNN library missing, or no usable GPU: see the server "
                         "log); fix the GPU set-up, or set allow_cpu_fallback: true in its model.yaml")


def _graph_dims(inputs) -> tuple[dict[str, list[tuple[int, str]]], dict[str, list[tuple[str, int]]]]:
    """From the graph's input declarations: each input's dynamic axes (axis, label), and each symbolic
    dimension that more than one input declares (name -> [(input, axis)]), which must agree."""
    dynamic: dict[str, list[tuple[int, str]]] = {}
    named: dict[str, list[tuple[str, int]]] = {}
    for tensor in inputs:
        for axis, dim in enumerate(tensor.shape or []):
            if isinstance(dim, int) and dim >= 0:
                continue
            label = f"{dim!r}" if isinstance(dim, str) and dim else "dynamic"
            dynamic.setdefault(tensor.name, []).append((axis, label))
            if isinstance(dim, str) and dim:
                named.setdefault(dim, []).append((tensor.name, axis))
    shared = {dim: places for dim, places in named.items() if len({name for name, _ in places}) > 1}
    return dynamic, shared


def declared_ranges(export: dict, parameters: dict, input_names: list[str]) -> dict[str, tuple[int, int]]:
    """Each integer input's valid values, [lo, hi): export.json's (a BERT's vocabulary, type vocabulary
    and 0/1 mask), overridden by the config parameters ``input_range.NAME: "lo:hi"``. The hook rejects
    anything outside with 1301; `toolkit bench perf` draws its token ids from the same ranges."""
    ranges = {k: v for k, v in _export_ranges(export).items() if k in input_names}
    for key, value in parameters.items():
        if key.startswith(RANGE_PREFIX):
            name = key[len(RANGE_PREFIX):]
            lo, sep, hi = str(value).partition(":")
            if name not in input_names or not sep or not lo.strip().lstrip("-").isdigit() \
                    or not hi.strip().lstrip("-").isdigit() or int(lo) >= int(hi):
                raise ValueError(f"parameter {key!r}: expected 'lo:hi' (hi exclusive) for one of the "
                                 f"inputs {input_names}, got {value!r}")
            ranges[name] = (int(lo), int(hi))
    return ranges


def _export_ranges(export: dict) -> dict[str, tuple[int, int]]:
    if export.get("kind") != "bert":
        return {}
    ranges = {"attention_mask": (0, 2)}
    if isinstance(export.get("vocab_size"), int):
        ranges["input_ids"] = (0, export["vocab_size"])
    if isinstance(export.get("type_vocab_size"), int):
        ranges["token_type_ids"] = (0, export["type_vocab_size"])
    return ranges


def _export_lengths(export: dict) -> dict[str, tuple[int, int]]:
    most = export.get("max_position_embeddings")
    if export.get("kind") != "bert" or not isinstance(most, int):
        return {}
    return {t["name"]: (t["dim_names"].index("sequence"), most) for t in export.get("inputs", [])
            if isinstance(t, dict) and "sequence" in (t.get("dim_names") or [])}
