"""`execution: fused`, without a server: the spec rules, what gen-repo refuses (naming the step) and
writes, and the runtime that runs the steps' hooks in one process with each step's own rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from projects import python_model, write_ensemble, write_model

from toolkit.errors import EnsembleError, RenderError, SpecError
from toolkit.hooks import Hook, HookError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.runtime.batching import Failure, Layout, TensorLayout
from toolkit.runtime.fused_runner import FusedPipeline, FusedStep, load_hook

HOOK_A = '''
from toolkit.hooks import Hook, HookError

class Hook1(Hook):
    def api_entry(self, request):
        if (request["X"] < 0).any():
            raise HookError(4001, "X must not be negative")
        return request

    def infer(self, batch):
        return {"Y": batch["X"] * float(self.factor)}

    def init(self, ctx):
        self.factor = ctx.parameters.get("factor", "1")
'''
HOOK_B = HOOK_A.replace("4001", "4002").replace('"X"', '"Y"').replace("batch[\"Y\"] * ", "batch[\"Y\"] + ")\
    .replace('{"Y": ', '{"Z": ')


def _chain(root: Path, **ensemble_extra) -> Path:
    write_model(root, "first", python_model([("X", "FP32", [-1])], [("Y", "FP32", [-1])], hook="hooks:Hook1",
                                            parameters={"factor": 2}, pad_inputs={"X": 0},
                                            trim_outputs={"Y": "X"}), files={"hooks.py": HOOK_A})
    write_model(root, "second", python_model([("Y", "FP32", [-1])], [("Z", "FP32", [-1])], hook="hooks:Hook1",
                                             parameters={"factor": 10}, instance_count=3),
                files={"hooks.py": HOOK_B})
    # listed out of order on purpose: the fused model runs them in dependency order
    write_ensemble(root, "chain", {"max_batch_size": 8, "execution": "fused",
                                   "inputs": [{"name": "IN", "dtype": "FP32", "dims": [-1]}],
                                   "outputs": [{"name": "OUT", "dtype": "FP32", "dims": [-1]}],
                                   "steps": [{"model": "second", "inputs": {"Y": "MID"}, "outputs": {"Z": "OUT"}},
                                             {"model": "first", "inputs": {"X": "IN"}, "outputs": {"Y": "MID"}}],
                                   **ensemble_extra})
    return root


def test_gen_repo_writes_one_python_model_with_every_step(tmp_path):
    project = load_project(*[_chain(tmp_path) / d for d in ("models", "ensembles")])
    repo = generate_repository(project, tmp_path / "repo").path
    plan = json.loads((repo / "chain" / "1" / "fused.json").read_text())
    assert [s["model"] for s in plan["steps"]] == ["first", "second"]
    assert sorted(p.name for p in (repo / "chain" / "1").iterdir()) == ["0-first", "1-second", "fused.json",
                                                                         "model.py"]
    assert (repo / "chain" / "1" / "0-first" / "hooks.py").read_text() == HOOK_A
    assert not (repo / "chain" / "1" / "0-first" / "model.py").exists()
    config = (repo / "chain" / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "count: 3" in config  # the busiest step's instances
    assert "allow_ragged_batch: true" in config  # IN is padded by the first step
    assert "ensemble_scheduling" not in config
    assert (repo / "first" / "config.pbtxt").is_file()  # the steps stay callable on their own


def test_load_project_notes_a_fused_ensemble_with_one_instance_behind_a_queue_policy(tmp_path):
    policy = {"default_queue_policy": {"max_queue_size": 8}}
    _chain(tmp_path, fused={"instance_count": 1, "dynamic_batching": policy})
    notes = load_project(tmp_path / "models", tmp_path / "ensembles").notes
    assert [n.split(":")[0] for n in notes if "one instance with a queue policy" in n] == ["chain"]
    _chain(tmp_path, fused={"dynamic_batching": policy})  # the busiest step's 3 instances
    notes = load_project(tmp_path / "models", tmp_path / "ensembles").notes
    assert not [n for n in notes if "one instance with a queue policy" in n]


def test_the_fused_model_batches_as_its_busiest_step_does(tmp_path):
    """The fused model's batches are mostly the busiest step's work (BERT's, in the example): its
    batcher, not the entry step's, unless the ensemble sets one."""
    _chain(tmp_path)
    write_model(tmp_path, "first", python_model(
        [("X", "FP32", [-1])], [("Y", "FP32", [-1])], hook="hooks:Hook1", parameters={"factor": 2},
        pad_inputs={"X": 0}, trim_outputs={"Y": "X"}, dynamic_batching={"max_queue_delay_microseconds": 300}),
        files={"hooks.py": HOOK_A})
    write_model(tmp_path, "second", python_model(
        [("Y", "FP32", [-1])], [("Z", "FP32", [-1])], hook="hooks:Hook1", parameters={"factor": 10},
        instance_count=3, dynamic_batching={"preferred_batch_size": [4]}), files={"hooks.py": HOOK_B})
    repo = generate_repository(load_project(tmp_path / "models", tmp_path / "ensembles"), tmp_path / "repo").path
    config = (repo / "chain" / "config.pbtxt").read_text()
    assert "count: 3" in config and "preferred_batch_size: [ 4 ]" in config
    assert "max_queue_delay_microseconds: 300" not in config


def test_fused_settings_override_the_defaults(tmp_path):
    _chain(tmp_path, fused={"instance_count": 1, "dynamic_batching": {"max_queue_delay_microseconds": 500,
                                                                       "preferred_batch_size": [4]},
                            "step_parameters": {"second": {"factor": 7}}})
    repo = generate_repository(load_project(tmp_path / "models", tmp_path / "ensembles"), tmp_path / "repo").path
    config = (repo / "chain" / "config.pbtxt").read_text()
    assert "count: 1" in config and "max_queue_delay_microseconds: 500" in config
    assert "preferred_batch_size: [ 4 ]" in config
    plan = json.loads((repo / "chain" / "1" / "fused.json").read_text())
    assert plan["steps"][1]["config"]["parameters"]["factor"] == {"string_value": "7"}  # fused copy only
    assert plan["steps"][0]["config"]["parameters"]["factor"] == {"string_value": "2"}
    assert 'string_value: "10"' in (repo / "second" / "config.pbtxt").read_text()


@pytest.mark.parametrize("extra, message", [
    ({"execution": "ensemble", "fused": {"instance_count": 2}}, "'fused' settings need 'execution: fused'"),
    ({"max_batch_size": 0}, "execution: fused needs max_batch_size > 0"),
    ({"execution": "parallel"}, "'parallel' is not one of the allowed values"),
    ({"fused": {"dynamic_batching": {"preferred_batch_size": [16]}}}, "exceeds max_batch_size 8"),
    ({"fused": {"step_parameters": {"third": {"x": 1}}}}, "names ['third'], which are not steps"),
])
def test_bad_fused_specs_are_refused(tmp_path, extra, message):
    _chain(tmp_path, **extra)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_project(tmp_path / "models", tmp_path / "ensembles")


def test_a_step_that_is_an_ensemble_or_does_not_batch_is_refused_by_name(tmp_path):
    _chain(tmp_path)
    write_model(tmp_path, "flat", python_model([("X", "FP32", [-1])], [("Y", "FP32", [-1])], max_batch_size=0))
    write_ensemble(tmp_path, "inner", {"max_batch_size": 8, "inputs": [{"name": "A", "dtype": "FP32", "dims": [-1]}],
                                       "outputs": [{"name": "B", "dtype": "FP32", "dims": [-1]}],
                                       "steps": [{"model": "first", "inputs": {"X": "A"}, "outputs": {"Y": "B"}}]})
    write_ensemble(tmp_path, "outer", {"max_batch_size": 8, "execution": "fused",
                                       "inputs": [{"name": "A", "dtype": "FP32", "dims": [-1]}],
                                       "outputs": [{"name": "B", "dtype": "FP32", "dims": [-1]}],
                                       "steps": [{"model": "inner", "inputs": {"A": "A"}, "outputs": {"B": "B"}}]})
    with pytest.raises(EnsembleError, match="cannot fuse step 'inner': it is an ensemble"):
        load_project(tmp_path / "models", tmp_path / "ensembles")
    (tmp_path / "ensembles" / "outer.yaml").unlink()
    write_ensemble(tmp_path, "flatten", {"max_batch_size": 0, "execution": "ensemble",
                                         "inputs": [{"name": "A", "dtype": "FP32", "dims": [-1]}],
                                         "outputs": [{"name": "B", "dtype": "FP32", "dims": [-1]}],
                                         "steps": [{"model": "flat", "inputs": {"X": "A"}, "outputs": {"Y": "B"}}]})
    load_project(tmp_path / "models", tmp_path / "ensembles")  # fine as an ensemble
    from toolkit.repository.dag import check_fusable
    from toolkit.repository.spec import EnsembleSpec

    specs = load_project(tmp_path / "models", tmp_path / "ensembles").specs()
    fused = EnsembleSpec.model_validate({**specs["flatten"].model_dump(), "max_batch_size": 8,
                                         "execution": "fused"})
    problems = check_fusable(fused, specs)
    assert len(problems) == 1 and "cannot fuse step 'flat': it does not batch" in str(problems[0])


def test_an_onnx_step_cannot_be_fused_on_the_container_target(tmp_path):
    from onnx_models import write_linear_onnx

    _chain(tmp_path)
    write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 8})
    write_linear_onnx(tmp_path / "models" / "linear" / "1" / "model.onnx")
    spec = load_project(tmp_path / "models").models["linear"].spec
    write_ensemble(tmp_path, "onnxchain", {
        "max_batch_size": 8, "execution": "fused",
        "inputs": [{"name": t.name, "dtype": t.dtype, "dims": t.dims} for t in spec.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "dims": t.dims} for t in spec.outputs],
        "steps": [{"model": "linear", "inputs": {t.name: t.name for t in spec.inputs},
                   "outputs": {t.name: t.name for t in spec.outputs}}]})
    project = load_project(tmp_path / "models", tmp_path / "ensembles")
    generate_repository(project, tmp_path / "embedded")  # python-only server: fused works
    with pytest.raises(RenderError, match="cannot fuse step 'linear' on the container target"):
        generate_repository(project, tmp_path / "container", target="container")
    assert not (tmp_path / "container").exists()


class _Double(Hook):
    def api_entry(self, request):
        if (request["A"] < 0).any():
            raise HookError(4001, "A must not be negative")
        return request

    def infer(self, batch):
        self.calls.append(batch["A"].shape)
        return {"B": batch["A"] * 2}

    def init(self, ctx):
        self.calls = []


class _Sum(Hook):
    def api_entry(self, request):
        if (request["B"] > 100).any():
            raise HookError(4002, "B is too large")
        return request

    def infer(self, batch):
        return {"C": batch["B"].sum(axis=1, keepdims=True)}


def _layout(inp: str, out: str, out_dims: tuple[int, ...], pad: bool) -> Layout:
    return Layout(8, {inp: TensorLayout(inp, np.dtype(np.float32), (-1,))},
                  {out: TensorLayout(out, np.dtype(np.float32), out_dims)}, pad={inp: 0.0} if pad else {},
                  trim={out: inp} if pad and out_dims == (-1,) else {})


def test_runtime_keeps_each_steps_rules_and_codes():
    double, total = _Double(), _Sum()
    double.init(None)
    pipeline = FusedPipeline([
        FusedStep("double", double, _layout("A", "B", (-1,), pad=True), {"A": "IN"}, {"B": "MID"}),
        FusedStep("sum", total, _layout("B", "C", (1,), pad=True), {"B": "MID"}, {"C": "OUT"}),
    ], ["OUT"])
    requests = [{"IN": np.array([[1, 2, 3]], np.float32)}, {"IN": np.array([[-1.0]], np.float32)},
                {"IN": np.array([[60.0]], np.float32)}, {"IN": np.array([[4, 5]], np.float32)}]
    results, per_step = pipeline.run(requests)
    assert results[0]["OUT"].tolist() == [[12.0]] and results[3]["OUT"].tolist() == [[18.0]]
    assert results[1] == Failure(4001, "A must not be negative", invalid_input=True)  # first step's code
    assert results[2] == Failure(4002, "B is too large", invalid_input=True)  # second step's code
    assert double.calls == [(3, 3)]  # three accepted requests padded into one call (pad_inputs)
    assert len(per_step["double"]) == 4 and len(per_step["sum"]) == 3  # a failed request skips later steps
    assert set(results[0]) == {"OUT"}  # only the ensemble's outputs leave


class _RowMean(Hook):
    def infer(self, batch):
        return {"M": batch["V"].mean(axis=1)}  # one value per row: [n]


class _Scale(Hook):
    def infer(self, batch):
        assert batch["S"].ndim == 2  # dims [1]: what Triton's ensemble would pass on
        return {"R": batch["S"] * 10}


def test_runtime_passes_a_per_row_scalar_between_steps_as_tritons_ensemble_would():
    mean = Layout(8, {"V": TensorLayout("V", np.dtype(np.float32), (2,))},
                  {"M": TensorLayout("M", np.dtype(np.float32), (), api_dims=(1,))}, pad={}, trim={})
    scale = Layout(8, {"S": TensorLayout("S", np.dtype(np.float32), (1,))},
                   {"R": TensorLayout("R", np.dtype(np.float32), (1,))}, pad={}, trim={})
    pipeline = FusedPipeline([FusedStep("mean", _RowMean(), mean, {"V": "IN"}, {"M": "MID"}),
                              FusedStep("scale", _Scale(), scale, {"S": "MID"}, {"R": "OUT"})], ["OUT"])
    results, _ = pipeline.run([{"IN": np.array([[1, 3], [5, 7]], np.float32)}, {"IN": np.ones((1, 2), np.float32)}])
    assert results[0]["OUT"].tolist() == [[20.0], [60.0]] and results[1]["OUT"].tolist() == [[10.0]]


def test_two_steps_may_ship_a_module_of_the_same_name(tmp_path):
    for name, text in (("a", HOOK_A), ("b", HOOK_B)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "hooks.py").write_text(text)
    first, second = load_hook("hooks:Hook1", tmp_path / "a", "0-a"), load_hook("hooks:Hook1", tmp_path / "b", "1-b")
    assert first is not second
    with pytest.raises(RuntimeError, match="fused step '2-c': cannot load hook hooks:Nope"):
        load_hook("hooks:Nope", tmp_path / "a", "2-c")
