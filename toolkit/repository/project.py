"""Load a project's specs from disk into validated, resolved objects.

A project is two folders:

    model_repository/<model>/model.yaml     one folder per model: its spec, hook files, assets,
    model_repository/<model>/<version>/     and version folders with exported artifacts
    ensembles/<ensemble>.yaml               one file per ensemble (the DAG)

Loading validates every file, resolves what the spec leaves to the artifacts (an ONNX model's
inputs and outputs), locates hook classes without importing user code, checks every ensemble, and
reports all problems at once. Nothing is written here.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path

from toolkit.errors import SpecError
from toolkit.repository.dag import check_ensemble, check_fusable, check_nesting, step_order
from toolkit.repository.spec import (
    DTYPES,
    AnySpec,
    DynamicBatching,
    EnsembleSpec,
    FusedOptions,
    ModelSpec,
    TensorSpec,
    parse_spec,
    read_yaml,
)

MODEL_FILE = "model.yaml"


@dataclass(frozen=True)
class ModelSource:
    spec: ModelSpec
    folder: Path
    versions: list[int]
    #: A hook module that lives in the model folder (copied into the repository), or None.
    hook_path: Path | None = None
    #: ``api_path`` as the hook class declares it, read from its source without importing it.
    hook_api_path: str | None = None

    @property
    def api_path(self) -> str | None:
        return self.spec.api_path or self.hook_api_path


@dataclass(frozen=True)
class EnsembleSource:
    spec: EnsembleSpec
    file: Path

    @property
    def api_path(self) -> str | None:
        return self.spec.api_path


@dataclass
class Project:
    models: dict[str, ModelSource] = field(default_factory=dict)
    ensembles: dict[str, EnsembleSource] = field(default_factory=dict)
    #: Things worth telling the user that are not errors.
    notes: list[str] = field(default_factory=list)

    def specs(self) -> dict[str, AnySpec]:
        out: dict[str, AnySpec] = {n: m.spec for n, m in self.models.items()}
        out.update({n: e.spec for n, e in self.ensembles.items()})
        return out


def load_project(models_dir: Path, ensembles_dir: Path | None = None) -> Project:
    """Read and check every spec; raise one SpecError listing every problem found."""
    problems: list[SpecError] = []
    project = Project()
    if not models_dir.is_dir():
        raise SpecError(f"models folder not found: {models_dir}")

    failed: dict[str, SpecError] = {}  # model folder name -> why it did not load
    strays: list[Path] = []
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not (folder / MODEL_FILE).is_file():
            strays.append(folder)  # not a model: reported below, never fatal
            continue
        try:
            source = load_model(folder)
            project.models[source.spec.name] = source
        except SpecError as e:
            failed[folder.name] = e
    # A missing export is a root cause: what only fails because of it (an asset inside its version
    # folder, an ensemble that uses it) is not reported on its own, only counted.
    missing = {name for name, e in failed.items() if getattr(e, "missing_export", False)}
    knock_on: list[str] = []
    for name, e in failed.items():
        asset = getattr(e, "missing_asset", None)
        if asset is not None and any(_inside(asset, models_dir / m) for m in missing):
            knock_on.append(f"model '{name}' (its asset {asset.name})")
        else:
            problems.append(e)
    for folder in strays:
        onnx = sorted(folder.glob("*/*.onnx"))
        hint = (f"it holds {onnx[0].relative_to(models_dir)}: an export written without --out? Re-export with "
                f"`--out {models_dir}/<model>` (the folder whose model.yaml expects it) and remove this folder"
                if onnx else f"add {folder / MODEL_FILE} or move the folder out of {models_dir}")
        if onnx and len(missing) == 1:
            hint += f"; or `mv {onnx[0].parent} {models_dir / next(iter(missing))}/` if it is that model's"
        project.notes.append(f"skipped {folder}/: not a model, it has no {MODEL_FILE} ({hint})")

    if ensembles_dir is not None and ensembles_dir.is_dir():
        for file in sorted([*ensembles_dir.glob("*.yaml"), *ensembles_dir.glob("*.yml")]):
            try:
                spec = parse_spec(read_yaml(file), EnsembleSpec, file=file, default_name=file.stem)
            except SpecError as e:
                problems.append(e)
                continue
            if spec.name in project.models or spec.name in project.ensembles:
                problems.append(SpecError("another model or ensemble already has this name",
                                          file=str(file), model=spec.name, field="name"))
                continue
            project.ensembles[spec.name] = EnsembleSource(spec, file)

    problems.extend(_resolve_api_paths(project))
    specs = project.specs()
    unavailable = set(failed)
    for ens in project.ensembles.values():
        waiting = sorted({step.model for step in ens.spec.steps} & unavailable)
        if waiting:  # checked once those models load: their absence is already reported
            knock_on.append(f"ensemble '{ens.spec.name}' (uses {', '.join(waiting)})")
            continue
        problems.extend(check_ensemble(ens.spec, specs, file=str(ens.file)))
        if ens.spec.execution == "fused":
            problems.extend(check_fusable(ens.spec, specs, file=str(ens.file)))
    if not failed:
        problems.extend(check_nesting(specs))
    if not specs and not problems and not failed:
        problems.append(SpecError(f"no models found: expected {models_dir}/<model>/{MODEL_FILE}"))
    if knock_on:
        problems.append(SpecError(f"not checked until the above is fixed: {'; '.join(knock_on)}"))
    if problems:  # a stray folder is often the cause (an export without --out): say so in the error
        problems = [SpecError(note) for note in project.notes if note.startswith("skipped ")] + problems
        if len(problems) == 1:
            raise problems[0]
        raise SpecError(f"{len(problems)} problems:\n" + "\n".join(f"- {p}" for p in problems))
    project.notes.extend(_queue_notes(project))
    project.notes.extend(_lone_instance_notes(project))
    return project


def _queue_notes(project: Project) -> list[str]:
    """A step without a queue policy queues without bound and runs requests whose callers gave up."""
    unbounded = sorted(name for name, m in project.models.items()
                       if m.spec.max_batch_size > 0 and (m.spec.dynamic_batching is None
                                                         or m.spec.dynamic_batching.default_queue_policy is None))
    if not unbounded:
        return []
    return [f"{', '.join(unbounded)}: no queue policy, so the queue has no bound and work whose caller gave up "
            "is still done; set dynamic_batching.default_queue_policy (max_queue_size, "
            "default_timeout_microseconds, allow_timeout_override: true)"]


def _lone_instance_notes(project: Project) -> list[str]:
    """Triton's batcher with a queue policy (r24.10, unchanged in core's main as of 2026-12) forms no
    batch ahead: it hands one only to an instance that is already waiting, and nothing wakes it when
    an instance becomes free; a later arrival or its 500 ms timeout does. A model with ONE instance
    then leaves a request that arrived while the instance was finishing its previous batch queued
    for 500 ms: 14 of 1,500 requests at concurrency 1 on a fused embedding measured it. Cheap steps
    behind a heavier one were not hit (0 of 3,600 at concurrency 1-4); the heavy models are named."""
    lone = sorted(name for name, m in project.models.items()
                  if m.spec.kind == "onnx" and m.spec.instances == 1 and _enforced(m.spec.dynamic_batching))
    for name, ens in project.ensembles.items():
        if ens.spec.execution == "fused":
            steps = [project.models[ens.spec.steps[i].model].spec for i in step_order(ens.spec)]
            count, batching = (ens.spec.fused or FusedOptions()).resolved(steps)
            if count == 1 and _enforced(batching):
                lone.append(name)
    if not lone:
        return []
    return [f"{', '.join(lone)}: one instance with a queue policy: Triton's batcher then hands work only to a "
            "waiting instance and is not woken when it frees, so a request that arrives while the instance "
            "finishes its previous batch can wait 500 ms; use instance_count >= 2 (a fused ensemble: "
            "fused.instance_count), or drop default_queue_policy (BENCHMARKS.md, 'The 500 ms stall')"]


def _enforced(batching: DynamicBatching | None) -> bool:
    return batching is not None and batching.default_queue_policy is not None \
        and batching.default_queue_policy.enforced


def _resolve_api_paths(project: Project) -> list[SpecError]:
    """One model per api_path (the route a REST gateway serves).

    A spec's explicit ``api_path`` beats one inherited from a hook class (the tokenizer of the
    ``embedding`` ensemble declares ``embedding`` too), and two explicit claims are an error. Models
    sharing one hook class inherit the same path; then none of them gets it, and a note says so.
    """
    explicit: dict[str, list[str]] = {}
    inherited: dict[str, list[str]] = {}
    for name, source in [*project.models.items(), *project.ensembles.items()]:
        if source.spec.api_path:
            explicit.setdefault(source.spec.api_path, []).append(name)
        elif isinstance(source, ModelSource) and source.hook_api_path:
            inherited.setdefault(source.hook_api_path, []).append(name)
    problems = []
    for path, names in sorted(explicit.items()):
        if len(names) > 1:
            problems.append(SpecError(f"api_path '{path}' is claimed by {len(names)} models: "
                                      f"{', '.join(sorted(names))}; give each its own api_path"))
    for path, names in sorted(inherited.items()):
        if path in explicit or len(names) > 1:
            for name in names:
                project.models[name] = replace(project.models[name], hook_api_path=None)
        if path not in explicit and len(names) > 1:
            project.notes.append(f"api_path '{path}' of hook class is shared by {', '.join(sorted(names))}: "
                                 "none of them gets that route; set api_path in the spec of the one meant")
    return problems


def read_model_spec(folder: Path) -> ModelSpec:
    """``<folder>/model.yaml`` parsed and validated on its own (nothing else of the folder is read)."""
    file = folder / MODEL_FILE
    if not file.is_file():
        raise SpecError(f"model folder has no {MODEL_FILE}", file=str(folder))
    spec = parse_spec(read_yaml(file), ModelSpec, file=file, default_name=folder.name)
    assert isinstance(spec, ModelSpec)
    if spec.name != folder.name:
        raise SpecError(f"name must equal its folder name '{folder.name}' (Triton requires it)", file=str(file),
                        model=spec.name, field="name")
    return spec


def load_model(folder: Path) -> ModelSource:
    file = folder / MODEL_FILE
    spec = read_model_spec(folder)

    def fail(message: str, field: str | None = None) -> SpecError:
        return SpecError(message, file=str(file), model=spec.name, field=field)

    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for dst, src in spec.assets.items():
        if not (folder / src).is_file():
            error = fail(f"asset '{dst}': file not found: {folder / src}", f"assets.{dst}")
            error.missing_asset = folder / src  # type: ignore[attr-defined]
            raise error

    hook_path, hook_api_path = None, None
    if spec.kind == "python":
        versions = versions or [1]
        hook_path, hook_api_path = _locate_hook(folder, spec.hook, fail)
    else:
        versions = [v for v in versions if (folder / str(v) / spec.file).is_file()]
        if not versions:
            how = (f"`{spec.export.strip()} --out {folder}`" if spec.export
                   else f"`toolkit export keras|bert SOURCE --out {folder}` (see export/README.md)")
            error = fail(f"no version folder holds '{spec.file}' (expected {folder}/1/{spec.file}): "
                         f"export it first: {how}", "file")
            error.missing_export = True  # type: ignore[attr-defined]
            raise error
        spec = _with_onnx_io(spec, folder / str(versions[-1]) / spec.file, fail)

    try:
        spec.check_padding()
    except ValueError as e:
        raise fail(str(e), "pad_inputs") from None
    return ModelSource(spec, folder, versions, hook_path, hook_api_path)


def _inside(path: Path, folder: Path) -> bool:
    import os

    return os.path.normpath(path).startswith(os.path.normpath(folder) + os.sep)


def _locate_hook(folder: Path, ref: str, fail) -> tuple[Path | None, str | None]:
    module, cls = ref.split(":")
    local = folder / f"{module}.py"
    if "." not in module and local.is_file():
        path = local
    else:
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.origin or not found.origin.endswith(".py"):
            raise fail(f"hook module '{module}' is neither {local} nor an importable module", "hook")
        path = Path(found.origin)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise fail(f"hook module {path} has a syntax error at line {e.lineno}: {e.msg}", "hook") from None
    node = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls), None)
    if node is None:
        raise fail(f"hook module {path} defines no class '{cls}'", "hook")
    return (path if path == local else None), _class_string_attr(node, "api_path")


def _class_string_attr(node: ast.ClassDef, attr: str) -> str | None:
    for stmt in node.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else (
            [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
        value = getattr(stmt, "value", None)
        if any(isinstance(t, ast.Name) and t.id == attr for t in targets) and isinstance(
                value, ast.Constant) and isinstance(value.value, str):
            return value.value
    return None


def _with_onnx_io(spec: ModelSpec, path: Path, fail) -> ModelSpec:
    """Fill an ONNX model's inputs/outputs from the file, or check the declared ones against it."""
    inputs, outputs = read_onnx_io(path, spec.max_batch_size, fail)
    problems = onnx_io_problems(spec, inputs, outputs, path.name)
    if problems:
        field, message = problems[0]
        raise fail(message, field)
    return spec.model_copy(update={"inputs": spec.inputs or inputs, "outputs": spec.outputs or outputs})


def onnx_io_problems(spec: ModelSpec, inputs: list[TensorSpec], outputs: list[TensorSpec],
                     label: str) -> list[tuple[str, str]]:
    """Every way the inputs/outputs a spec declares disagree with an ONNX file's (as ``read_onnx_io``
    reads them for the spec's max_batch_size), as ``(field, message)``; ``label`` names the file.
    A side the spec leaves out is read from the file and cannot disagree; a declared side must name
    every tensor of the file (the ONNX hook feeds all inputs and returns all outputs)."""
    problems: list[tuple[str, str]] = []
    for side, found in (("inputs", inputs), ("outputs", outputs)):
        declared = getattr(spec, side)
        if not declared:
            continue
        kind = side[:-1]
        by_name = {t.name: t for t in found}
        names = {t.name for t in declared}
        undeclared = [t for t in found if t.name not in names]
        has = ", ".join(f"'{t.name}'" for t in undeclared) or f"no other {kind}"
        for i, t in enumerate(declared):
            real = by_name.get(t.name)
            if real is None:  # names the file's undeclared tensors: renamed ones show up here
                problems.append((f"{side}[{i}].name", f"declares {kind} '{t.name}' but {label} has {has}"))
            elif real.dtype != t.dtype or len(real.dims) != len(t.dims) or any(
                    r not in (-1, d) for r, d in zip(real.dims, t.dims, strict=True)):
                problems.append((f"{side}[{i}]", f"{kind} '{t.name}' is declared {t.dtype} {t.dims} but {label} "
                                 f"has {real.dtype} {real.dims}"))
        if undeclared and names <= set(by_name):
            problems.append((side, f"does not declare {kind} {has} of {label} ("
                             f"{', '.join(f'{t.dtype} {t.dims}' for t in undeclared)}): declare all its {side} "
                             "or none"))
    return problems


_ONNX_TO_DTYPE = {"float32": "FP32", "float16": "FP16", "float64": "FP64", "int8": "INT8",
                  "int16": "INT16", "int32": "INT32", "int64": "INT64", "uint8": "UINT8",
                  "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64", "bool": "BOOL",
                  "object": "BYTES"}
assert set(_ONNX_TO_DTYPE.values()) == set(DTYPES)


@dataclass(frozen=True)
class OnnxTensor:
    """A graph input or output of an ONNX file as the file has it: ``shape`` includes the first
    (batch) axis; -1 is an axis without a fixed size."""

    name: str
    dtype: str
    shape: list[int]


def read_onnx_shapes(path: Path, fail) -> tuple[list[OnnxTensor], list[OnnxTensor]]:
    """An ONNX file's graph inputs (initializers left out) and outputs. Reads the graph only:
    external data (``model.onnx.data``) is never loaded."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:
        raise fail(f"cannot read ONNX file {path}: {e}", "file") from e
    initializers = {i.name for i in graph.initializer}

    def convert(values) -> list[OnnxTensor]:
        out = []
        for v in values:
            if v.name in initializers:
                continue
            ttype = v.type.tensor_type
            dtype = _ONNX_TO_DTYPE.get(str(tensor_dtype_to_np_dtype(ttype.elem_type)))
            if dtype is None:
                raise fail(f"tensor '{v.name}' of {path.name} has a type Triton cannot serve", "file")
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            out.append(OnnxTensor(v.name, dtype, dims))
        return out

    return convert(graph.input), convert(graph.output)


def has_batch_axis(tensors: list[OnnxTensor]) -> bool:
    """Whether every tensor has a variable first axis, which Triton can batch requests along."""
    return bool(tensors) and all(t.shape and t.shape[0] == -1 for t in tensors)


def read_onnx_io(path: Path, max_batch_size: int, fail) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An ONNX file's inputs and outputs as a spec with this max_batch_size declares them."""
    inputs, outputs = read_onnx_shapes(path, fail)
    return (onnx_tensor_specs(inputs, max_batch_size, fail, path.name),
            onnx_tensor_specs(outputs, max_batch_size, fail, path.name))


def onnx_tensor_specs(tensors: list[OnnxTensor], max_batch_size: int, fail, label: str) -> list[TensorSpec]:
    """ONNX tensors as a spec with this max_batch_size declares them: without the batch axis when
    it batches (``[batch]`` becomes dims ``[]``, one value per row); ``label`` names the file."""
    out = []
    for t in tensors:
        dims = list(t.shape)
        if max_batch_size > 0:
            if not dims or dims[0] != -1:
                raise fail(f"max_batch_size > 0 needs a variable first (batch) axis, but "
                           f"'{t.name}' of {label} has shape {dims}", "max_batch_size")
            dims = dims[1:]  # [] is one value per row: served as dims [1] + reshape []
        elif not dims:
            raise fail(f"'{t.name}' of {label} is a 0-d scalar (shape []), which Triton cannot serve "
                       "without a batch axis: give it shape [1], or a batch axis (shape [batch]) and "
                       "max_batch_size > 0", "file")
        out.append(TensorSpec(name=t.name, dtype=t.dtype, dims=dims))
    return out
