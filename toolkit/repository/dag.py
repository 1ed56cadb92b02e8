"""Offline checks of an ensemble's DAG (Paddle Serving's operator workflow, run by Triton).

Steps are wired by named tensors. Triton would refuse a miswired ensemble only when it loads it,
with one terse line in its log; we check everything before a file is written and report every
problem at once, naming the step and the tensor:

- every step model exists, is not the ensemble itself, and no ensembles contain each other;
- every mapped tensor is an input / output of the step's model, every required input is mapped;
- one producer per tensor, and an ensemble input is never produced by a step;
- every consumed tensor is an ensemble input or produced by some step, and the steps form no cycle;
- every ensemble output is produced; every ensemble input and produced tensor is used;
- dtypes and dims agree between producer and consumer (-1 matches any size);
- the ensemble's max_batch_size does not exceed a step model's.
"""

from __future__ import annotations

from collections.abc import Mapping

from toolkit.errors import EnsembleError
from toolkit.repository.spec import AnySpec, EnsembleSpec, TensorSpec


def full_dims(owner: AnySpec, tensor: TensorSpec) -> list[int]:
    """Dims including the batch axis when the owner batches, so any two owners compare alike. A
    per-row scalar (dims []) travels between steps as Triton serves it: [batch, 1]."""
    return ([-1] if owner.max_batch_size > 0 else []) + tensor.api_dims


def dims_agree(a: list[int], b: list[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def describe(owner: AnySpec, tensor: TensorSpec) -> str:
    return f"{tensor.dtype} {full_dims(owner, tensor)}"


def check_ensemble(ens: EnsembleSpec, specs: Mapping[str, AnySpec], *, file: str | None = None
                   ) -> list[EnsembleError]:
    """Every wiring problem of one ensemble (an empty list when it is sound)."""
    problems: list[EnsembleError] = []

    def fail(message: str, field: str) -> None:
        problems.append(EnsembleError(message, file=file, model=ens.name, field=field))

    ens_inputs = {t.name: t for t in ens.inputs}
    # tensor name -> (owner spec, tensor spec, description of the producer)
    produced: dict[str, tuple[AnySpec, TensorSpec, str]] = {
        name: (ens, t, f"ensemble input '{name}'") for name, t in ens_inputs.items()}
    producer_step: dict[str, int] = {}
    step_models: dict[int, AnySpec] = {}

    for i, step in enumerate(ens.steps):
        where = f"steps[{i}]"
        target = specs.get(step.model)
        if step.model == ens.name:
            fail("an ensemble cannot contain itself", f"{where}.model")
            continue
        if target is None:
            known = ", ".join(sorted(n for n in specs if n != ens.name)) or "none"
            fail(f"step model '{step.model}' does not exist (known models: {known})", f"{where}.model")
            continue
        step_models[i] = target
        if ens.max_batch_size > target.max_batch_size:
            fail(f"ensemble max_batch_size {ens.max_batch_size} exceeds model '{step.model}' "
                 f"max_batch_size {target.max_batch_size}", f"{where}.model")
        for model_tensor in step.inputs:
            if target.input(model_tensor) is None:
                fail(f"model '{step.model}' has no input '{model_tensor}' "
                     f"(its inputs: {[t.name for t in target.inputs]})", f"{where}.inputs.{model_tensor}")
        for t in target.inputs:
            if not t.optional and t.name not in step.inputs:
                fail(f"required input '{t.name}' of model '{step.model}' is not mapped", f"{where}.inputs")
        for model_tensor, ens_tensor in step.outputs.items():
            out = target.output(model_tensor)
            field = f"{where}.outputs.{model_tensor}"
            if out is None:
                fail(f"model '{step.model}' has no output '{model_tensor}' "
                     f"(its outputs: {[t.name for t in target.outputs]})", field)
            elif ens_tensor in ens_inputs:
                fail(f"tensor '{ens_tensor}' is an ensemble input and cannot also be produced by "
                     f"{where} ({step.model})", field)
            elif ens_tensor in producer_step:
                j = producer_step[ens_tensor]
                fail(f"tensor '{ens_tensor}' has two producers: steps[{j}] ({ens.steps[j].model}) "
                     f"and {where} ({step.model})", field)
            else:
                producer_step[ens_tensor] = i
                produced[ens_tensor] = (target, out, f"output '{model_tensor}' of {where} ({step.model})")

    consumed: set[str] = set()
    depends_on: dict[int, set[int]] = {i: set() for i in step_models}
    for i, target in step_models.items():
        step = ens.steps[i]
        for model_tensor, ens_tensor in step.inputs.items():
            consumed.add(ens_tensor)
            want = target.input(model_tensor)
            field = f"steps[{i}].inputs.{model_tensor}"
            if ens_tensor not in produced:
                fail(f"tensor '{ens_tensor}' consumed by steps[{i}] ({step.model}) is neither an "
                     "ensemble input nor produced by any step", field)
                continue
            if ens_tensor in producer_step:
                depends_on[i].add(producer_step[ens_tensor])
            if want is None:
                continue
            owner, have, origin = produced[ens_tensor]
            if have.dtype != want.dtype or not dims_agree(full_dims(owner, have), full_dims(target, want)):
                fail(f"tensor '{ens_tensor}' is {describe(owner, have)} ({origin}) but model "
                     f"'{step.model}' input '{model_tensor}' expects {describe(target, want)}", field)

    cycle = _find_cycle(depends_on)
    if cycle:
        path = " -> ".join(f"steps[{i}] ({ens.steps[i].model})" for i in cycle)
        fail(f"the steps form a cycle: {path}", "steps")

    for out in ens.outputs:
        field = f"outputs.{out.name}"
        if out.name in ens_inputs:
            fail(f"ensemble output '{out.name}' cannot also be an ensemble input", field)
        elif out.name not in producer_step:
            fail(f"ensemble output '{out.name}' is not produced by any step", field)
        else:
            owner, have, origin = produced[out.name]
            if have.dtype != out.dtype or not dims_agree(full_dims(owner, have), full_dims(ens, out)):
                fail(f"ensemble output '{out.name}' is declared {describe(ens, out)} but {origin} "
                     f"is {describe(owner, have)}", field)

    outputs = {t.name for t in ens.outputs}
    for name in ens_inputs:
        if name not in consumed:
            fail(f"ensemble input '{name}' is not used by any step", f"inputs.{name}")
    for name, i in producer_step.items():
        if name not in consumed and name not in outputs:
            fail(f"tensor '{name}' produced by steps[{i}] ({ens.steps[i].model}) is never used; "
                 "drop it from the step's outputs", f"steps[{i}].outputs")
    return problems


def _find_cycle(depends_on: Mapping[int, set[int]]) -> list[int]:
    """A cycle among steps as a list that starts and ends at the same step, or []."""
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    path: list[int] = []

    def visit(node: int) -> list[int]:
        state[node] = 1
        path.append(node)
        for dep in sorted(depends_on.get(node, ())):
            if state.get(dep) == 1:
                start = path.index(dep)
                return [*path[start:], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(depends_on):
        if node not in state:
            found = visit(node)
            if found:
                return list(reversed(found))
    return []


def check_nesting(specs: Mapping[str, AnySpec]) -> list[EnsembleError]:
    """Ensembles that contain each other (directly or through others) would never load."""
    problems = []
    for name, spec in sorted(specs.items()):
        if not isinstance(spec, EnsembleSpec):
            continue
        seen, frontier = set(), [s.model for s in spec.steps]
        while frontier:
            child = frontier.pop()
            if child == name:
                problems.append(EnsembleError("ensembles contain each other in a loop", model=name,
                                              field="steps"))
                break
            child_spec = specs.get(child)
            if child in seen or not isinstance(child_spec, EnsembleSpec):
                continue
            seen.add(child)
            frontier.extend(s.model for s in child_spec.steps)
    return problems


def step_order(ens: EnsembleSpec) -> list[int]:
    """The steps' indices in an order where every step comes after the steps it consumes from
    (the listed order wherever the wiring allows). Call on an ensemble ``check_ensemble`` accepted."""
    producer = {t: i for i, s in enumerate(ens.steps) for t in s.outputs.values()}
    done: list[int] = []
    pending = list(range(len(ens.steps)))
    while pending:
        ready = next(i for i in pending if all(producer.get(t) in (None, *done) for t in ens.steps[i].inputs.values()))
        done.append(ready)
        pending.remove(ready)
    return done


def check_fusable(ens: EnsembleSpec, specs: Mapping[str, AnySpec], *, file: str | None = None
                  ) -> list[EnsembleError]:
    """``execution: fused`` runs every step's hook in one python model: each step must be a model
    with a hook (python) or an ONNX file the built-in onnxruntime hook runs, and must batch."""
    problems = []
    for i, step in enumerate(ens.steps):
        target = specs.get(step.model)
        where = f"steps[{i}].model"
        if isinstance(target, EnsembleSpec):
            problems.append(EnsembleError(f"execution: fused cannot fuse step '{step.model}': it is an ensemble; "
                                          "fuse its steps into this one instead", file=file, model=ens.name,
                                          field=where))
        elif target is not None and target.max_batch_size == 0:
            problems.append(EnsembleError(f"execution: fused cannot fuse step '{step.model}': it does not batch "
                                          "(max_batch_size 0) while the fused model does", file=file,
                                          model=ens.name, field=where))
    return problems
