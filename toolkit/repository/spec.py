"""The declarative spec: one ``model.yaml`` per model folder, one YAML file per ensemble.

Everything is validated into typed objects before a single file of the repository is written, and
every problem is reported with the file, the model and the field it came from. Field names follow
Triton's own ``model_config.proto`` spelling wherever Triton has one, so a Triton user recognises
them; the few toolkit-only fields (``hook``, ``pad_inputs``, ``trim_outputs``, ``assets``,
``api_path``) are documented on the classes below.

    # model_repository/scale/model.yaml
    kind: python
    hook: scale:Scale                # module in this folder (or importable), and the Hook class
    max_batch_size: 16
    inputs:  [{name: X, dtype: FP32, dims: [4]}]
    outputs: [{name: Y, dtype: FP32, dims: [4]}]
    dynamic_batching:
      max_queue_delay_microseconds: 2000
      preferred_batch_size: [8, 16]
      default_queue_policy: {timeout_action: REJECT, default_timeout_microseconds: 10000000,
                             max_queue_size: 256}
    instance_count: 2
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from toolkit.errors import SpecError
from toolkit.repository.placement import FieldError, InstanceGroup, Optimization, check_placement, resolve_groups
from toolkit.runtime.params import GPU_PREFIX, thread_parameters

#: Triton's data types (``TYPE_`` prefix dropped; BYTES is proto TYPE_STRING) -> numpy dtype name.
DTYPES: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64",
    "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
DType = Literal["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                "FP16", "FP32", "FP64", "BYTES"]

# Triton turns a model name into a folder name and a URL path segment; we allow what is safe for both.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_TENSOR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
_HOOK_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
RESERVED_PARAMETER_PREFIX = "toolkit."


def check_model_name(name: str) -> str:
    if not _MODEL_NAME.match(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use letters, digits, '_', '-', '.' (no '/', no '..', "
            "at most 128 characters, not starting with '.' or '-')")
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    """One input or output tensor. ``dims`` exclude the batch dimension; -1 means variable.

    ``dims: []`` (a model with max_batch_size > 0 only) is one value per batch row: the model sees
    shape ``[batch]``. Triton needs at least one dim, so it is served as ``dims: [1]`` with
    ``reshape: { shape: [] }``: clients and ensemble steps exchange ``[batch, 1]``, the model
    ``[batch]``.
    """

    name: str
    dtype: DType
    dims: list[int]
    #: Inputs only: the request may omit it (Triton's ``optional``).
    optional: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _TENSOR_NAME.match(v):
            raise ValueError(f"invalid tensor name {v!r}: use letters, digits, '_', '.', ':', '-'")
        return v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.upper().removeprefix("TYPE_")
            return "BYTES" if v == "STRING" else v
        return v

    @field_validator("dims")
    @classmethod
    def _dims(cls, v: list[int]) -> list[int]:
        bad = [d for d in v if d == 0 or d < -1]
        if bad:
            raise ValueError(f"dims must be positive or -1 (variable), got {v}")
        return v

    @property
    def variable_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.dims) if d == -1]

    @property
    def api_dims(self) -> list[int]:
        """The dims clients and ensemble steps see: ``[1]`` for a per-row scalar (``dims: []``)."""
        return list(self.dims) or [1]


class QueuePolicy(_Strict):
    """Triton's ModelQueuePolicy: go-infer's MessageTimeout, enforced by Triton itself."""

    timeout_action: Literal["REJECT", "DELAY"] = "REJECT"
    default_timeout_microseconds: int = Field(default=0, ge=0)
    allow_timeout_override: bool = False
    max_queue_size: int = Field(default=0, ge=0)

    @property
    def enforced(self) -> bool:
        """Whether Triton has anything to enforce. Then its batcher stops forming batches ahead and
        hands one only to an instance that is already waiting (with one instance that costs up to
        500 ms now and then: see ``_lone_instance_notes`` in project.py)."""
        return self.default_timeout_microseconds > 0 or self.allow_timeout_override or self.max_queue_size > 0


class DynamicBatching(_Strict):
    """Triton's dynamic batcher: replaces go-infer's Redis queue."""

    max_queue_delay_microseconds: int = Field(default=0, ge=0)
    preferred_batch_size: list[int] = Field(default_factory=list)
    preserve_ordering: bool = False
    default_queue_policy: QueuePolicy | None = None

    @field_validator("preferred_batch_size")
    @classmethod
    def _preferred(cls, v: list[int]) -> list[int]:
        if any(b < 1 for b in v):
            raise ValueError(f"preferred batch sizes must be >= 1, got {v}")
        return sorted(set(v))


class VersionPolicy(_Strict):
    """Exactly one of ``latest`` (serve the N newest), ``all``, or ``specific`` versions."""

    latest: int | None = Field(default=None, ge=1)
    all: bool | None = None
    specific: list[Annotated[int, Field(ge=1)]] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> VersionPolicy:
        chosen = [k for k in ("latest", "all", "specific") if getattr(self, k) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("version_policy takes exactly one of latest: N, all: true, specific: [..]")
        return self


def _stringify(v: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in v.items():
        if isinstance(value, dict | list):
            raise ValueError(f"parameter {key!r} must be a scalar, got {type(value).__name__}")
        out[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    return out


class _ModelBase(_Strict):
    name: str
    max_batch_size: int = Field(default=0, ge=0)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)
    version_policy: VersionPolicy = VersionPolicy(latest=1)
    #: Free-form config ``parameters``; scalars are stored as strings, as Triton does.
    parameters: dict[str, str] = Field(default_factory=dict)
    #: The name clients and the REST gateway use (go-infer's ApiPath); defaults to the hook's.
    api_path: str | None = None

    @field_validator("name")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _parameters(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = _stringify(v)
            reserved = [k for k in v if k.startswith(RESERVED_PARAMETER_PREFIX)]
            if reserved:
                raise ValueError(f"parameter keys starting with 'toolkit.' are reserved: {reserved}")
        return v

    @model_validator(mode="after")
    def _unique_tensors(self) -> _ModelBase:
        for side in ("inputs", "outputs"):
            names = [t.name for t in getattr(self, side)]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"duplicate {side[:-1]} names: {dup}")
        scalars = [t.name for t in [*self.inputs, *self.outputs] if not t.dims]
        if scalars and self.max_batch_size == 0:
            raise ValueError(f"{', '.join(repr(n) for n in scalars)}: dims [] (one value per batch row) needs "
                             "max_batch_size > 0; without a batch axis give the tensor dims [1]")
        return self

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


class ModelSpec(_ModelBase):
    """A model Triton runs: user hooks (``python``) or an ONNX file (``onnx``)."""

    kind: Literal["python", "onnx"]
    #: python: ``module:Class``; the module is a ``.py`` file in the model folder or importable.
    hook: str | None = None
    #: onnx: the file inside each version folder.
    file: str = "model.onnx"
    #: onnx: the command that makes ``file`` (``toolkit export ...`` without ``--out``); gen-repo
    #: prints it, with ``--out <this model's folder>``, when the file is missing. Documentation only.
    export: str | None = None
    dynamic_batching: DynamicBatching | None = None
    #: go-infer's MaxWorkers: how many copies of the model Triton runs in parallel (on the CPU).
    instance_count: int = Field(default=1, ge=1, le=64)
    #: Where the instances run: ``{kind: gpu, gpus: [0, 1], count: 2}`` (count per GPU) or a list of
    #: groups; replaces ``instance_count`` (toolkit/repository/placement.py).
    instance_group: list[InstanceGroup] | None = None
    #: onnx with a gpu group: run on the CPU where no GPU (or no onnxruntime-gpu) is found, instead
    #: of failing to load. Off by default: a GPU spec never falls back silently.
    allow_cpu_fallback: bool = False
    #: GPU accelerators (onnx) and pinned memory, in Triton's ModelOptimizationPolicy spelling.
    optimization: Optimization | None = None
    #: Inputs whose variable dims are padded with this value so requests of different lengths
    #: share one ``infer`` call (without it, requests are grouped by equal shape instead).
    pad_inputs: dict[str, float] = Field(default_factory=dict)
    #: Outputs whose variable dims are cut back per request to that padded input's length.
    trim_outputs: dict[str, str] = Field(default_factory=dict)
    #: The cost of one more ``infer`` call, in padded elements per row (e.g. tokens). When > 0 a
    #: padded dynamic batch is split into length buckets wherever that saves more padding than it
    #: costs (on CPU, padding waste decides variable-length workloads); 0 = one padded call.
    bucket_call_cost: float = Field(default=0, ge=0)
    #: With length buckets: also sort the rows of a multi-row (bulk) request into buckets one by
    #: one. Positions past a row's own length then come back as zeros instead of the model's output
    #: for padding (golden samples with padded rows record the latter), so it is opt-in.
    bucket_rows: bool = False
    #: Files copied into every version folder: ``{name in version folder: path from model folder}``.
    assets: dict[str, str] = Field(default_factory=dict)

    @field_validator("hook")
    @classmethod
    def _hook(cls, v: str | None) -> str | None:
        if v is not None and not _HOOK_REF.match(v):
            raise ValueError(f"hook must look like 'module:ClassName' (e.g. 'scale:Scale'), got {v!r}")
        return v

    @field_validator("instance_group", mode="before")
    @classmethod
    def _one_group(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("assets")
    @classmethod
    def _assets(cls, v: dict[str, str]) -> dict[str, str]:
        for dst in v:
            if "/" in dst or dst in (".", "..", "model.py") or not dst:
                raise ValueError(f"asset name {dst!r} must be a plain file name other than model.py")
        return v

    @model_validator(mode="after")
    def _kind_rules(self) -> ModelSpec:
        if self.kind == "python":
            if not self.hook:
                raise ValueError("a python model needs 'hook: module:ClassName'")
            if not self.inputs or not self.outputs:
                raise ValueError("a python model must declare its inputs and outputs")
        elif self.hook:
            raise ValueError("'hook' is only for kind: python (an onnx model runs its file)")
        else:
            check_onnx_parameters(self.parameters)
            reserved = sorted(k for k in self.parameters if k.startswith(GPU_PREFIX))
            if reserved:
                raise FieldError("parameters", f"{reserved}: 'gpu.' keys are written by gen-repo from "
                                 "instance_group and optimization; set those instead")
        check_placement(self.groups, self.optimization, kind=self.kind, allow_cpu_fallback=self.allow_cpu_fallback)
        if self.dynamic_batching and self.max_batch_size == 0:
            raise ValueError("dynamic_batching needs max_batch_size > 0")
        if self.dynamic_batching:
            too_big = [b for b in self.dynamic_batching.preferred_batch_size if b > self.max_batch_size]
            if too_big:
                raise ValueError(f"preferred_batch_size {too_big} exceeds max_batch_size {self.max_batch_size}")
        return self

    @property
    def groups(self) -> list[InstanceGroup]:
        """The instance groups: ``instance_group`` as given, else ``instance_count`` CPU instances."""
        return resolve_groups(self.instance_group, self.instance_count, "instance_count" in self.model_fields_set)

    @property
    def on_gpu(self) -> bool:
        return any(g.kind == "gpu" for g in self.groups)

    @property
    def instances(self) -> int:
        """The instances Triton starts, counting a gpu group without ``gpus`` as on one GPU."""
        return sum(g.count * len(g.gpus or [0]) for g in self.groups)

    def check_padding(self) -> None:
        """Padding refers to tensors, so it is checked once inputs/outputs are final (onnx)."""
        if (self.pad_inputs or self.trim_outputs) and self.max_batch_size == 0:
            raise ValueError("pad_inputs / trim_outputs need max_batch_size > 0")
        if self.bucket_rows and not self.bucket_call_cost:
            raise ValueError("bucket_rows sorts rows into length buckets: it needs bucket_call_cost > 0")
        if self.bucket_call_cost and not self.pad_inputs:
            raise ValueError("bucket_call_cost splits padded batches: it needs pad_inputs")
        for name in self.pad_inputs:
            spec = self.input(name)
            if spec is None:
                raise ValueError(f"pad_inputs names unknown input '{name}'")
            if not spec.variable_axes:
                raise ValueError(f"pad_inputs: input '{name}' has no variable (-1) dim to pad")
            if spec.dtype == "BYTES":
                raise ValueError(f"pad_inputs: input '{name}' is BYTES and cannot be padded")
        for name, like in self.trim_outputs.items():
            spec = self.output(name)
            if spec is None:
                raise ValueError(f"trim_outputs names unknown output '{name}'")
            if like not in self.pad_inputs:
                raise ValueError(f"trim_outputs: '{name}' is trimmed like '{like}', which is not in pad_inputs")
            if not spec.variable_axes or len(spec.variable_axes) > len(self.input(like).variable_axes):
                raise ValueError(f"trim_outputs: output '{name}' variable dims {spec.dims} do not "
                                 f"correspond to input '{like}' variable dims {self.input(like).dims}")


def check_onnx_parameters(params: dict[str, str], where: str = "parameter") -> None:
    """The ONNX hook's thread settings, refused at gen-repo rather than when the model loads."""
    thread_parameters(params, where)


class EnsembleStep(_Strict):
    """One step of the DAG. Maps are ``{step model's tensor: ensemble tensor}``, as in Triton."""

    model: str
    version: int = Field(default=-1, ge=-1)
    inputs: dict[str, str]
    outputs: dict[str, str]

    @field_validator("model")
    @classmethod
    def _model_name(cls, v: str) -> str:
        return check_model_name(v)


class FusedOptions(_Strict):
    """How Triton serves a fused ensemble, which is one python model: its instances and batcher.
    Defaults: the busiest step's instance count and batcher (the first step with the most instances:
    the one whose work the fused model's batches mostly are, e.g. BERT's preferred batch size)."""

    instance_count: int | None = Field(default=None, ge=1, le=64)
    dynamic_batching: DynamicBatching | None = None
    #: Per step model, parameters that replace its own inside the fused model only, e.g.
    #: ``{bert: {intra_op_threads: 1}}`` (its instances now also run the other steps).
    step_parameters: dict[str, dict[str, str]] = Field(default_factory=dict)

    @field_validator("step_parameters", mode="before")
    @classmethod
    def _step_parameters(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = {step: _stringify(params) if isinstance(params, dict) else params for step, params in v.items()}
        return v

    def resolved(self, steps: list[ModelSpec]) -> tuple[int, DynamicBatching]:
        """The fused model's instance count and batcher, for its step models in dependency order:
        these options where set, else the busiest step's count and batcher (the entry step's batcher
        when the busiest has none)."""
        busiest = max(steps, key=lambda s: s.instance_count)
        batching = self.dynamic_batching or busiest.dynamic_batching or steps[0].dynamic_batching
        return self.instance_count or busiest.instance_count, batching or DynamicBatching()


class EnsembleSpec(_ModelBase):
    """Paddle Serving's operator DAG, run by Triton's ensemble scheduler (``execution: ensemble``,
    the default: each step a model of its own, scaled apart) or by one python model that runs the
    steps' hooks in one process (``execution: fused``: no hand-off between processes per step)."""

    kind: Literal["ensemble"] = "ensemble"
    steps: list[EnsembleStep] = Field(min_length=1)
    execution: Literal["ensemble", "fused"] = "ensemble"
    fused: FusedOptions | None = None

    @model_validator(mode="after")
    def _io(self) -> EnsembleSpec:
        if not self.inputs or not self.outputs:
            raise ValueError("an ensemble must declare its inputs and outputs")
        scalars = [t.name for t in [*self.inputs, *self.outputs] if not t.dims]
        if scalars:  # Triton checks an ensemble's reshape against its steps' dims, which are [1]
            raise ValueError(f"{', '.join(repr(n) for n in scalars)}: an ensemble passes tensors as its steps' "
                             "clients see them, so a step's per-row scalar (dims []) is dims [1] here")
        if self.fused is not None and self.execution != "fused":
            raise ValueError("'fused' settings need 'execution: fused'")
        if self.execution == "fused" and self.max_batch_size == 0:
            raise ValueError("execution: fused needs max_batch_size > 0 (the fused model batches requests)")
        unknown = sorted(set(self.fused.step_parameters) - {s.model for s in self.steps}) if self.fused else []
        if unknown:
            raise ValueError(f"fused.step_parameters names {unknown}, which are not steps of this ensemble")
        batching = self.fused.dynamic_batching if self.fused else None
        if batching is not None:
            too_big = [b for b in batching.preferred_batch_size if b > self.max_batch_size]
            if too_big:
                raise ValueError(f"fused.dynamic_batching.preferred_batch_size {too_big} exceeds max_batch_size "
                                 f"{self.max_batch_size}")
        return self


AnySpec = ModelSpec | EnsembleSpec


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SpecError(f"not valid YAML: {e}", file=str(path)) from e
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror}", file=str(path)) from e
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping of fields, got {type(data).__name__}", file=str(path))
    return data


def parse_spec(data: dict[str, Any], cls: type[AnySpec], *, file: Path, default_name: str) -> AnySpec:
    """Validate one spec mapping, naming every problem's field."""
    data = {"name": default_name, **data}
    model = data.get("name") if isinstance(data.get("name"), str) else default_name
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or None
            msg = err["msg"].removeprefix("Value error, ")
            blamed = (err.get("ctx") or {}).get("error")
            if isinstance(blamed, FieldError):  # a rule across fields, raised naming the field it blames
                field, msg = ".".join(filter(None, (field, blamed.field))), str(blamed)
            if err["type"] == "extra_forbidden":
                msg = "unknown field (check its spelling)"
            elif err["type"] == "literal_error" and "input" in err:
                msg = f"{err['input']!r} is not one of the allowed values: {msg}"
            problems.append(SpecError(msg, file=str(file), model=model, field=field))
        if len(problems) == 1:
            raise problems[0] from None
        raise SpecError("\n".join(str(p) for p in problems)) from None
