"""Where a model's instances run: CPU or GPU instance groups, the ONNX GPU accelerators, pinned memory.

    instance_group: {kind: gpu, gpus: [0, 1], count: 2}    # 2 instances on each of GPUs 0 and 1
    instance_group:                                          # or several groups
      - {kind: gpu, gpus: [0], count: 2}
      - {kind: cpu, count: 1}
    allow_cpu_fallback: false        # true: an ONNX model runs on the CPU where no GPU (or no
                                     # onnxruntime-gpu) is found, instead of failing to load
    optimization:                    # Triton's ModelOptimizationPolicy, in its own spelling
      gpu_execution_accelerator: {name: tensorrt, precision_mode: FP16, max_workspace_size_bytes: 1073741824}
      input_pinned_memory: true
      output_pinned_memory: true

``instance_count: N`` stays what it was: N CPU instances (it cannot be combined with
``instance_group``). ``count`` of a gpu group is per GPU, as in Triton; ``gpus`` left out means every
GPU the server sees (container target) or GPU 0 (embedded target: the hook places its own sessions).

How the two targets serve it:
- container (Triton's onnxruntime backend): ``instance_group { kind: KIND_GPU gpus: [..] }`` and
  ``optimization { execution_accelerators { gpu_execution_accelerator [{name: "tensorrt" ...}] } }``,
  the backend's own parameter keys (its README: ``precision_mode``, ``max_workspace_size_bytes``).
- embedded (python backend only): an ONNX model's instances are python stubs, CPU processes either
  way; the ONNX hook opens its onnxruntime session on the instance's GPU (CUDA, or TensorRT first
  when asked) from the ``gpu.*`` parameters below. Its group is rendered KIND_CPU, so that a model
  that allows the CPU fallback still loads where there is no GPU; ``toolkit serve`` refuses, before
  starting, a repository that needs a GPU on a machine without one. A python hook model gets
  Triton's KIND_GPU as written (its hook reads the device Triton gives it).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from toolkit.runtime.params import (
    GPU_ACCELERATOR,
    GPU_DEVICES,
    GPU_FALLBACK,
    GPU_OPTION_PREFIX,
)


class FieldError(ValueError):
    """A rule across fields, raised naming the field it blames (pydantic gives such a rule no location;
    ``spec.parse_spec`` reports it under this field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


#: The embedded target's GPU when a group names none (the ONNX hook cannot ask Triton how many it sees).
EMBEDDED_DEFAULT_GPU = 0


class InstanceGroup(Strict):
    """Triton's ModelInstanceGroup: ``count`` instances on the CPU, or ``count`` on each listed GPU."""

    kind: Literal["cpu", "gpu"] = "cpu"
    count: int = Field(default=1, ge=1, le=64)
    #: gpu only: the device ids (``nvidia-smi`` numbering); left out = every GPU the server sees.
    gpus: list[int] | None = None

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> Any:
        return v.lower().removeprefix("kind_") if isinstance(v, str) else v

    @field_validator("gpus")
    @classmethod
    def _gpus(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("list at least one device id, or leave the field out for every GPU")
        if any(g < 0 for g in v) or len(set(v)) != len(v):
            raise ValueError(f"expected distinct device ids >= 0 (nvidia-smi numbering), got {v}")
        return v

    @model_validator(mode="after")
    def _gpus_need_gpu(self) -> InstanceGroup:
        if self.gpus is not None and self.kind != "gpu":
            raise FieldError("gpus", "only a group of kind gpu runs on GPUs (set kind: gpu, or drop gpus)")
        return self


class GpuAccelerator(Strict):
    """One entry of the onnxruntime backend's ``gpu_execution_accelerator``: TensorRT (with its
    precision and workspace) or CUDA; ``parameters`` passes further backend keys as they are."""

    name: Literal["tensorrt", "cuda"]
    #: tensorrt: the precision TensorRT may build the engine in (Triton's default FP32).
    precision_mode: Literal["FP32", "FP16"] | None = None
    #: tensorrt: the most GPU memory the engine may use as scratch space (Triton's default 1 GiB).
    max_workspace_size_bytes: int | None = Field(default=None, ge=1 << 20)
    #: More of the backend's keys, e.g. ``{trt_engine_cache_enable: 1}`` (its README lists them).
    parameters: dict[str, str] = Field(default_factory=dict)

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("precision_mode", mode="before")
    @classmethod
    def _precision(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = [k for k, value in v.items() if isinstance(value, dict | list)]
            if bad:
                raise ValueError(f"parameters {bad} must be scalars")
            return {str(k): str(value).lower() if isinstance(value, bool) else str(value) for k, value in v.items()}
        return v

    @model_validator(mode="after")
    def _tensorrt_only(self) -> GpuAccelerator:
        if self.name != "tensorrt":
            given = [f for f in ("precision_mode", "max_workspace_size_bytes") if getattr(self, f) is not None]
            if given:
                raise FieldError(given[0], f"a TensorRT option ({', '.join(given)}); name: {self.name} takes "
                                 "none (use name: tensorrt)")
        clash = sorted({"precision_mode", "max_workspace_size_bytes"} & set(self.parameters))
        if clash:
            raise FieldError("parameters", f"{clash}: give them as fields of gpu_execution_accelerator")
        return self

    def backend_parameters(self) -> dict[str, str]:
        """The key/value pairs of the onnxruntime backend (strings, as its config takes them)."""
        params = dict(self.parameters)
        if self.precision_mode is not None:
            params["precision_mode"] = self.precision_mode
        if self.max_workspace_size_bytes is not None:
            params["max_workspace_size_bytes"] = str(self.max_workspace_size_bytes)
        return dict(sorted(params.items()))


class Optimization(Strict):
    """The parts of Triton's ModelOptimizationPolicy a spec may set."""

    gpu_execution_accelerator: GpuAccelerator | None = None
    #: Triton stages inputs / outputs in page-locked host memory for faster GPU copies (its default: on).
    input_pinned_memory: bool | None = None
    output_pinned_memory: bool | None = None


def check_placement(groups: list[InstanceGroup], optimization: Optimization | None, *, kind: str,
                    allow_cpu_fallback: bool) -> None:
    """The rules that tie the fields together (raised as ValueError: the spec names the model)."""
    on_gpu = any(g.kind == "gpu" for g in groups)
    accelerator = optimization.gpu_execution_accelerator if optimization else None
    if accelerator is not None:
        if kind != "onnx":
            raise FieldError("optimization.gpu_execution_accelerator", "only an onnx model runs on onnxruntime's "
                             "GPU accelerators")
        if not on_gpu:
            raise FieldError("optimization.gpu_execution_accelerator", "needs an instance_group of kind gpu "
                             "(a CPU instance never uses it)")
    if allow_cpu_fallback and not on_gpu:
        raise FieldError("allow_cpu_fallback", "says what to do when a GPU is missing, but no instance_group "
                         "is of kind gpu")
    if allow_cpu_fallback and kind != "onnx":
        raise FieldError("allow_cpu_fallback", "only an onnx model can fall back (Triton cannot load a python "
                         "model's GPU instances without a GPU)")


def resolve_groups(instance_group: list[InstanceGroup] | None, instance_count: int,
                   count_given: bool) -> list[InstanceGroup]:
    """The spec's groups: ``instance_group`` (one or a list), else ``instance_count`` CPU instances."""
    if instance_group is None:
        return [InstanceGroup(kind="cpu", count=instance_count)]
    if count_given:
        raise FieldError("instance_group", "give either instance_count (that many CPU instances) or "
                         "instance_group, not both: move the count into instance_group")
    if not instance_group:
        raise FieldError("instance_group", "list at least one group")
    return list(instance_group)


def instance_groups_config(groups: list[InstanceGroup], *, native_gpu: bool) -> list[dict[str, Any]]:
    """Triton's ``instance_group`` list. ``native_gpu=False`` (an ONNX model on the embedded server):
    GPU groups become CPU instances, as many as Triton would start, each placed by the ONNX hook."""
    out = []
    for g in groups:
        if g.kind == "gpu" and native_gpu:
            out.append({"count": g.count, "kind": "KIND_GPU", **({"gpus": list(g.gpus)} if g.gpus else {})})
        else:
            devices = len(g.gpus or [EMBEDDED_DEFAULT_GPU]) if g.kind == "gpu" else 1
            out.append({"count": g.count * devices, "kind": "KIND_CPU"})
    return out


def hook_device_parameters(groups: list[InstanceGroup], optimization: Optimization | None,
                           allow_cpu_fallback: bool) -> dict[str, str]:
    """The embedded ONNX hook's ``gpu.*`` parameters: each instance slot's device (in the order of
    ``instance_groups_config(native_gpu=False)``), the accelerator and its options, the fallback."""
    if not any(g.kind == "gpu" for g in groups):
        return {}
    slots: list[str] = []
    for g in groups:
        if g.kind == "gpu":
            slots += [str(device) for device in (g.gpus or [EMBEDDED_DEFAULT_GPU]) for _ in range(g.count)]
        else:
            slots += ["cpu"] * g.count
    params = {GPU_DEVICES: ",".join(slots)}
    accelerator = optimization.gpu_execution_accelerator if optimization else None
    params[GPU_ACCELERATOR] = accelerator.name if accelerator else "cuda"
    if accelerator is not None:
        params.update({GPU_OPTION_PREFIX + k: v for k, v in accelerator.backend_parameters().items()})
    if allow_cpu_fallback:
        params[GPU_FALLBACK] = "true"
    return params


def optimization_config(optimization: Optimization | None, *, accelerators: bool) -> dict[str, Any]:
    """Triton's ``optimization`` fields a spec sets (``accelerators``: the onnxruntime backend's)."""
    if optimization is None:
        return {}
    out: dict[str, Any] = {}
    accelerator = optimization.gpu_execution_accelerator
    if accelerators and accelerator is not None:
        entry: dict[str, Any] = {"name": accelerator.name}
        if accelerator.backend_parameters():
            entry["parameters"] = accelerator.backend_parameters()
        out["execution_accelerators"] = {"gpu_execution_accelerator": [entry]}
    for side in ("input_pinned_memory", "output_pinned_memory"):
        if getattr(optimization, side) is not None:
            out[side] = {"enable": getattr(optimization, side)}
    return out
