"""Spec validation: every malformed spec is a SpecError naming the file, the model and the field."""

from __future__ import annotations

import pytest
from onnx_models import write_linear_onnx, write_scalar_onnx
from projects import python_model, write_ensemble, write_model

from toolkit.errors import SpecError
from toolkit.repository.project import load_project

X_TO_Y = python_model([("X", "FP32", [4])], [("Y", "FP32", [4])])


def load(tmp_path):
    return load_project(tmp_path / "models", tmp_path / "ensembles")


def test_load_project_resolves_python_model_when_spec_is_valid(tmp_path):
    write_model(tmp_path, "scale", {**X_TO_Y, "dynamic_batching": {
        "max_queue_delay_microseconds": 100, "preferred_batch_size": [4, 2, 4],
        "default_queue_policy": {"default_timeout_microseconds": 5000, "max_queue_size": 8}}})
    model = load(tmp_path).models["scale"]
    assert model.spec.inputs[0].dtype == "FP32" and model.versions == [1]
    assert model.spec.dynamic_batching.preferred_batch_size == [2, 4]
    assert model.spec.dynamic_batching.default_queue_policy.timeout_action == "REJECT"
    assert model.hook_path.name == "hook.py" and model.api_path == "passthrough"


def test_load_project_reads_onnx_inputs_and_outputs_when_spec_omits_them(tmp_path):
    folder = write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4})
    write_linear_onnx(folder / "3" / "model.onnx")
    spec = load(tmp_path).models["linear"].spec
    assert [(t.name, t.dtype, t.dims) for t in spec.inputs] == [("x", "FP32", [4])]
    assert [(t.name, t.dtype, t.dims) for t in spec.outputs] == [("y", "FP32", [2])]


@pytest.mark.parametrize(("params", "words"), [
    ({"intra_op_threads": "all"}, "intra_op_threads: expected a positive integer or 'adaptive', got 'all'"),
    ({"intra_op_threads": 0}, "intra_op_threads: expected a positive integer or 'adaptive', got '0'"),
    ({"spin_threads": "yes"}, "spin_threads: expected false, true, run or solo, got 'yes'"),
])
def test_load_project_refuses_onnx_thread_parameters_the_hook_cannot_take(tmp_path, params, words):
    folder = write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4, "parameters": params})
    write_linear_onnx(folder / "1" / "model.onnx")
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    assert "models/linear/model.yaml" in str(info.value) and words in str(info.value)
    for good in ({"intra_op_threads": "adaptive"}, {"intra_op_threads": 2, "spin_threads": "run"}):
        write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4, "parameters": good})
        assert load(tmp_path).models["linear"].spec.parameters == {k: str(v) for k, v in good.items()}


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"inputs": [{"name": "X", "dtype": "FLOAT32", "dims": [4]}]}, "inputs.0.dtype", "FLOAT32"),
    ({"inputs": [{"name": "X", "dtype": "FP32", "dims": [0]}]}, "inputs.0.dims", "positive or -1"),
    ({"inputs": [{"name": "X", "dtype": "FP32"}]}, "inputs.0.dims", "Field required"),
    ({"inputs": [{"name": "bad name", "dtype": "FP32", "dims": [1]}]}, "inputs.0.name", "invalid tensor name"),
    ({"max_batch_size": -1}, "max_batch_size", "greater than or equal to 0"),
    ({"max_batchsize": 8}, "max_batchsize", "unknown field"),
    ({"kind": "tensorflow"}, "kind", "'tensorflow' is not one of the allowed values"),
    ({"hook": "no_colon"}, "hook", "module:ClassName"),
    ({"hook": None}, None, "needs 'hook: module:ClassName'"),
    ({"max_batch_size": 0, "dynamic_batching": {}}, None, "dynamic_batching needs max_batch_size > 0"),
    ({"dynamic_batching": {"preferred_batch_size": [16]}}, None, "exceeds max_batch_size 8"),
    ({"dynamic_batching": {"default_queue_policy": {"timeout_action": "DROP"}}},
     "dynamic_batching.default_queue_policy.timeout_action", "'DROP'"),
    ({"parameters": {"toolkit.hook": "x"}}, "parameters", "reserved"),
    ({"parameters": {"nested": {"a": 1}}}, "parameters", "must be a scalar"),
    ({"version_policy": {"latest": 1, "all": True}}, "version_policy", "exactly one of"),
    ({"instance_count": 0}, "instance_count", "greater than or equal to 1"),
    ({"outputs": [{"name": "Y", "dtype": "FP32", "dims": [4]}] * 2}, None, "duplicate output names"),
    ({"name": "../evil"}, "name", "invalid model name"),
    ({"name": "a/b"}, "name", "invalid model name"),
])
def test_load_project_names_file_model_and_field_when_spec_is_malformed(tmp_path, change, field, words):
    write_model(tmp_path, "scale", {**X_TO_Y, **change})
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    message = str(info.value)
    assert "models/scale/model.yaml" in message
    assert words in message
    if field:
        assert f"field '{field}'" in message


def test_load_project_reports_every_problem_when_several_files_are_broken(tmp_path):
    write_model(tmp_path, "one", {**X_TO_Y, "max_batch_size": "many"})
    write_model(tmp_path, "two", {**X_TO_Y, "inputs": [{"name": "X", "dtype": "FP99", "dims": [1]}]})
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    assert "2 problems" in str(info.value)
    assert "model 'one'" in str(info.value) and "model 'two'" in str(info.value)


def test_load_project_rejects_yaml_that_does_not_parse(tmp_path):
    folder = tmp_path / "models" / "broken"
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text("kind: python\ninputs: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken/model.yaml: not valid YAML"):
        load(tmp_path)


def test_load_project_rejects_name_that_differs_from_its_folder(tmp_path):
    write_model(tmp_path, "scale", {**X_TO_Y, "name": "other"})
    with pytest.raises(SpecError, match="must equal its folder name 'scale'"):
        load(tmp_path)


def test_load_project_rejects_hook_when_module_or_class_is_missing(tmp_path):
    write_model(tmp_path, "a", {**X_TO_Y, "hook": "nowhere:Hook"}, files={})
    with pytest.raises(SpecError, match="hook module 'nowhere' is neither"):
        load(tmp_path)
    write_model(tmp_path, "a", {**X_TO_Y, "hook": "hook:Missing"}, files={"hook.py": "class Other: pass\n"})
    with pytest.raises(SpecError, match="defines no class 'Missing'"):
        load(tmp_path)


def test_load_project_rejects_onnx_model_when_no_version_holds_the_file(tmp_path):
    write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4})
    with pytest.raises(SpecError, match=r"no version folder holds 'model.onnx'.*toolkit export"):
        load(tmp_path)


def test_load_project_rejects_onnx_model_when_declared_tensors_disagree_with_the_file(tmp_path):
    folder = write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4,
                                              "inputs": [{"name": "x", "dtype": "INT64", "dims": [4]}]})
    write_linear_onnx(folder / "1" / "model.onnx")
    with pytest.raises(SpecError, match=r"input 'x' is declared INT64 \[4\] but model.onnx has FP32 \[4\]"):
        load(tmp_path)


@pytest.mark.parametrize(("outputs", "words"), [
    ([{"name": "probs", "dtype": "FP32", "dims": [2]}], "declares output 'probs' but model.onnx has 'y'"),
    ([{"name": "score", "dtype": "FP32", "dims": []}], None),
])
def test_load_project_rejects_declared_onnx_outputs_that_are_not_all_of_the_files(tmp_path, outputs, words):
    folder = write_model(tmp_path, "m", {"kind": "onnx", "max_batch_size": 4, "outputs": outputs})
    (write_linear_onnx if words else write_scalar_onnx)(folder / "1" / "model.onnx")
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    # the ONNX hook returns every output of the file: a partial list would fail every request
    assert (words or "does not declare output 'doubled' of model.onnx (FP32 [4]): declare all its outputs "
            "or none") in str(info.value)


def test_load_project_reads_an_onnx_tensor_of_shape_batch_as_one_value_per_row(tmp_path):
    folder = write_model(tmp_path, "scalar", {"kind": "onnx", "max_batch_size": 8})
    write_scalar_onnx(folder / "1" / "model.onnx")
    spec = load(tmp_path).models["scalar"].spec
    assert [(t.name, t.dims) for t in spec.inputs] == [("x", [4]), ("offset", [])]
    assert [(t.name, t.dims) for t in spec.outputs] == [("score", []), ("doubled", [4])]
    write_model(tmp_path, "scalar", {"kind": "onnx", "max_batch_size": 0})  # no batching: an ordinary dim
    spec = load(tmp_path).models["scalar"].spec
    assert [(t.name, t.dims) for t in spec.outputs] == [("score", [-1]), ("doubled", [-1, 4])]


def test_load_project_refuses_dims_empty_without_a_batch_axis(tmp_path):
    write_model(tmp_path, "scale", python_model([("X", "FP32", [])], [("Y", "FP32", [])], max_batch_size=0))
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    assert "models/scale/model.yaml" in str(info.value)
    assert "'X', 'Y': dims [] (one value per batch row) needs max_batch_size > 0; without a batch axis give " \
           "the tensor dims [1]" in str(info.value)
    write_model(tmp_path, "scale", python_model([("X", "FP32", [])], [("Y", "FP32", [])], max_batch_size=4))
    assert load(tmp_path).models["scale"].spec.inputs[0].dims == []


def _write_0d_onnx(path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "zero_d",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    path.parent.mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize(("max_batch_size", "words"), [
    (0, "'x' of model.onnx is a 0-d scalar (shape []), which Triton cannot serve without a batch axis"),
    (4, "max_batch_size > 0 needs a variable first (batch) axis, but 'x' of model.onnx has shape []"),
])
def test_load_project_refuses_a_0d_onnx_tensor(tmp_path, max_batch_size, words):
    folder = write_model(tmp_path, "zero", {"kind": "onnx", "max_batch_size": max_batch_size})
    _write_0d_onnx(folder / "1" / "model.onnx")
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    assert words in str(info.value)


def test_load_project_refuses_dims_empty_on_an_ensemble_and_wires_a_scalar_step_output_as_dims_1(tmp_path):
    folder = write_model(tmp_path, "scalar", {"kind": "onnx", "max_batch_size": 8})
    write_scalar_onnx(folder / "1" / "model.onnx")
    write_model(tmp_path, "post", python_model([("S", "FP32", [1])], [("T", "FP32", [1])]))

    def ensemble(score_dims):
        return {"max_batch_size": 8, "inputs": [{"name": "x", "dtype": "FP32", "dims": [4]},
                                                {"name": "offset", "dtype": "FP32", "dims": [1]}],
                "outputs": [{"name": "t", "dtype": "FP32", "dims": score_dims}],
                "steps": [{"model": "scalar", "inputs": {"x": "x", "offset": "offset"},
                           "outputs": {"score": "s"}},
                          {"model": "post", "inputs": {"S": "s"}, "outputs": {"T": "t"}}]}

    write_ensemble(tmp_path, "pipe", ensemble([1]))  # Triton's ensemble sees score as [batch, 1]
    assert load(tmp_path).ensembles["pipe"]
    write_ensemble(tmp_path, "pipe", ensemble([]))
    with pytest.raises(SpecError) as info:
        load(tmp_path)
    assert "ensembles/pipe.yaml" in str(info.value)
    assert "'t': an ensemble passes tensors as its steps' clients see them, so a step's per-row scalar " \
           "(dims []) is dims [1] here" in str(info.value)


@pytest.mark.parametrize(("change", "words"), [
    ({"pad_inputs": {"X": 0}}, "no variable (-1) dim to pad"),
    ({"pad_inputs": {"Q": 0}}, "unknown input 'Q'"),
    ({"trim_outputs": {"Y": "X"}}, "not in pad_inputs"),
])
def test_load_project_rejects_padding_that_does_not_fit_the_tensors(tmp_path, change, words):
    write_model(tmp_path, "scale", {**X_TO_Y, **change})
    with pytest.raises(SpecError, match="pad_inputs") as info:
        load(tmp_path)
    assert words in str(info.value)


def test_load_project_rejects_missing_asset(tmp_path):
    write_model(tmp_path, "scale", {**X_TO_Y, "assets": {"vocab.txt": "../bert/1/vocab.txt"}})
    with pytest.raises(SpecError, match=r"asset 'vocab.txt': file not found"):
        load(tmp_path)


def test_load_project_gives_api_path_to_the_explicit_claim_over_the_hooks(tmp_path):
    from projects import write_ensemble

    write_model(tmp_path, "scale", X_TO_Y)  # its hook class declares api_path "passthrough"
    write_ensemble(tmp_path, "pipe", {"api_path": "passthrough", "max_batch_size": 8,
                                      "inputs": [{"name": "X", "dtype": "FP32", "dims": [4]}],
                                      "outputs": [{"name": "Y", "dtype": "FP32", "dims": [4]}],
                                      "steps": [{"model": "scale", "inputs": {"X": "X"}, "outputs": {"Y": "Y"}}]})
    project = load(tmp_path)
    assert project.ensembles["pipe"].api_path == "passthrough"
    assert project.models["scale"].api_path is None


def test_load_project_rejects_two_models_claiming_the_same_api_path(tmp_path):
    write_model(tmp_path, "one", {**X_TO_Y, "api_path": "same"})
    write_model(tmp_path, "two", {**X_TO_Y, "api_path": "same"})
    with pytest.raises(SpecError, match="api_path 'same' is claimed by 2 models: one, two"):
        load(tmp_path)


def test_load_project_gives_no_route_to_models_sharing_a_hook_api_path_and_says_so(tmp_path):
    write_model(tmp_path, "one", X_TO_Y)
    write_model(tmp_path, "two", X_TO_Y)  # the same hook class, api_path "passthrough"
    project = load(tmp_path)
    assert project.models["one"].api_path is None and project.models["two"].api_path is None
    assert project.notes[0] == ("api_path 'passthrough' of hook class is shared by one, two: none of them gets "
                                "that route; set api_path in the spec of the one meant")


def test_load_project_notes_steps_without_a_queue_policy(tmp_path):
    write_model(tmp_path, "one", X_TO_Y)
    write_model(tmp_path, "two", {**X_TO_Y, "api_path": "two", "dynamic_batching": {"default_queue_policy": {
        "max_queue_size": 8, "default_timeout_microseconds": 1000, "allow_timeout_override": True}}})
    notes = load(tmp_path).notes
    assert [n for n in notes if "no queue policy" in n] == [
        "one: no queue policy, so the queue has no bound and work whose caller gave up is still done; set "
        "dynamic_batching.default_queue_policy (max_queue_size, default_timeout_microseconds, "
        "allow_timeout_override: true)"]


POLICY = {"default_queue_policy": {"max_queue_size": 8, "default_timeout_microseconds": 1000,
                                   "allow_timeout_override": True}}


@pytest.mark.parametrize(("spec", "noted"), [
    ({"dynamic_batching": POLICY}, True),
    ({"dynamic_batching": POLICY, "instance_count": 2}, False),
    ({"dynamic_batching": {"default_queue_policy": {"timeout_action": "REJECT"}}}, False),  # nothing enforced
    ({"dynamic_batching": {}}, False),
])
def test_load_project_notes_a_lone_onnx_instance_behind_a_queue_policy(tmp_path, spec, noted):
    folder = write_model(tmp_path, "linear", {"kind": "onnx", "max_batch_size": 4, **spec})
    write_linear_onnx(folder / "1" / "model.onnx")
    notes = [n for n in load(tmp_path).notes if "one instance with a queue policy" in n]
    assert notes == ([notes[0]] if noted else [])
    if noted:
        assert notes[0].startswith("linear: ") and "500 ms" in notes[0] and "instance_count >= 2" in notes[0]
