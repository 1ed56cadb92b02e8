"""The model.yaml beside a fresh export (toolkit/export/servable.py): the default one loads and renders
with gen-repo's own code, and an existing one that no longer fits the new ONNX fails the export."""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
import pytest
import yaml
from google.protobuf import text_format
from onnx import TensorProto, helper
from onnx_models import write_linear_onnx, write_scalar_onnx
from tritonclient.grpc import model_config_pb2

from toolkit.errors import ExportError
from toolkit.export.servable import (
    DEFAULT_MAX_BATCH_SIZE,
    check_model_yaml,
    default_model_yaml,
    write_model_yaml,
)
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_model, load_project

ROOT = Path(__file__).parents[2]
COMMAND = "toolkit export keras MobileNetV2 --no-include-top --pooling avg"


def write_fixed_onnx(path: Path) -> Path:
    """x FP32 [1, 4] -> y FP32 [1, 4]: a batch axis fixed at export."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "fixed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def exported(tmp_path: Path, write=write_linear_onnx, name: str = "m") -> tuple[Path, Path]:
    folder = tmp_path / "models" / name
    return folder, write(folder / "1" / "model.onnx")


def served(folder: Path, target: str = "embedded") -> model_config_pb2.ModelConfig:
    """The config.pbtxt gen-repo writes for the folder's model (it validates it against Triton's
    ModelConfig before writing)."""
    repo = generate_repository(load_project(folder.parent), folder.parent.parent / f"repo-{target}",
                               target=target).path
    return text_format.Parse((repo / folder.name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_default_model_yaml_batches_a_model_whose_every_tensor_has_a_variable_first_axis(tmp_path):
    folder, onnx_path = exported(tmp_path)
    assert write_model_yaml(folder, onnx_path, f"{COMMAND} --out {folder}") == folder / "model.yaml"
    data = yaml.safe_load((folder / "model.yaml").read_text())
    assert data["kind"] == "onnx" and data["export"] == COMMAND  # without --out, as model.yaml's export means
    assert data["max_batch_size"] == DEFAULT_MAX_BATCH_SIZE
    assert data["dynamic_batching"] == {"max_queue_delay_microseconds": 0, "default_queue_policy": {
        "timeout_action": "REJECT", "default_timeout_microseconds": 10_000_000, "allow_timeout_override": True,
        "max_queue_size": 256}}
    source = load_model(folder)
    assert [(t.name, t.dims) for t in source.spec.inputs] == [("x", [4])]
    assert source.spec.export == COMMAND
    assert load_project(folder.parent).notes == []  # neither "no queue policy" nor "one instance" is noted
    for target in ("embedded", "container"):
        config = served(folder, target)
        assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE and config.instance_group[0].count == 2
        assert config.dynamic_batching.default_queue_policy.allow_timeout_override


def test_default_model_yaml_does_not_batch_a_model_with_a_fixed_first_axis_and_says_why(tmp_path):
    folder, onnx_path = exported(tmp_path, write_fixed_onnx)
    text = default_model_yaml(folder, onnx_path, COMMAND)
    assert "# No batching: 'x' [1, 4], 'y' [1, 4] have no variable first (batch) axis" in text
    data = yaml.safe_load(text)
    assert data["max_batch_size"] == 0 and "dynamic_batching" not in data
    write_model_yaml(folder, onnx_path, COMMAND)
    assert [(t.name, t.dims) for t in load_model(folder).spec.inputs] == [("x", [1, 4])]
    config = served(folder)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")


def test_default_model_yaml_serves_batch_only_tensors_as_one_value_per_row(tmp_path):
    folder, onnx_path = exported(tmp_path, write_scalar_onnx)
    write_model_yaml(folder, onnx_path, COMMAND)
    spec = load_model(folder).spec
    assert spec.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert [(t.name, t.dims) for t in spec.outputs] == [("score", []), ("doubled", [4])]
    config = served(folder)
    score = next(t for t in config.output if t.name == "score")
    assert list(score.dims) == [1] and score.HasField("reshape") and list(score.reshape.shape) == []


def test_default_model_yaml_reads_only_the_graph_of_an_onnx_with_external_data(tmp_path):
    folder, onnx_path = exported(tmp_path)
    model = onnx.load(str(onnx_path))
    onnx.save(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    (onnx_path.parent / "model.onnx.data").unlink()  # never opened
    assert yaml.safe_load(default_model_yaml(folder, onnx_path, COMMAND))["max_batch_size"] == DEFAULT_MAX_BATCH_SIZE
    check_model_yaml(folder, onnx_path)  # no model.yaml: nothing to check


@pytest.mark.parametrize(("command", "value"), [
    ("toolkit export keras a.keras --out=models/m --output-name 'a b'",
     "toolkit export keras a.keras --output-name 'a b'"),
    ("toolkit export bert --out model_repository/bert", "toolkit export bert"),
    ("toolkit export keras C:/x: y #1.keras", "toolkit export keras C:/x: y #1.keras"),  # quoted for YAML
])
def test_default_model_yaml_keeps_the_export_command_readable_by_the_spec(tmp_path, command, value):
    folder, onnx_path = exported(tmp_path)
    assert yaml.safe_load(default_model_yaml(folder, onnx_path, command))["export"] == value


def test_default_model_yaml_refuses_a_folder_name_triton_cannot_serve(tmp_path):
    folder, onnx_path = exported(tmp_path, name="my model")
    with pytest.raises(ExportError, match=r"--out .*my model: the folder's name is the Triton model's name"):
        default_model_yaml(folder, onnx_path, COMMAND)


def test_write_model_yaml_never_replaces_an_existing_one(tmp_path):
    folder, onnx_path = exported(tmp_path)
    folder.joinpath("model.yaml").write_text("kind: onnx\nmax_batch_size: 4\n")
    assert write_model_yaml(folder, onnx_path, COMMAND) is None
    assert folder.joinpath("model.yaml").read_text() == "kind: onnx\nmax_batch_size: 4\n"
    check_model_yaml(folder, onnx_path)


def test_check_model_yaml_accepts_the_examples_own_yaml_for_a_fitting_onnx(tmp_path):
    folder, onnx_path = exported(tmp_path, name="mobilenet")
    shutil.copy(ROOT / "model_repository" / "mobilenet" / "model.yaml", folder / "model.yaml")
    check_model_yaml(folder, onnx_path)  # declares no tensors; batched, and the ONNX has a batch axis


def _yaml(folder: Path, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump({"kind": "onnx", "max_batch_size": 8, **fields}))


def test_check_model_yaml_names_every_declared_tensor_the_new_onnx_disagrees_with(tmp_path):
    folder = tmp_path / "models" / "m"
    _yaml(folder, inputs=[{"name": "x", "dtype": "INT64", "dims": [4]}],
          outputs=[{"name": "probs", "dtype": "FP32", "dims": [2]}])
    onnx_path = write_linear_onnx(tmp_path / "staging" / "model.onnx")  # a staged export
    with pytest.raises(ExportError) as info:
        check_model_yaml(folder, onnx_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / 'model.yaml'}: input 'x' is declared INT64 [4] but the new ONNX has "
                              "FP32 [4]; declares output 'probs' but the new ONNX has 'y'. The way out: update ")
    assert "or remove it, and the export writes a default one" in message


def test_check_model_yaml_wants_every_output_declared_when_some_are(tmp_path):
    folder, onnx_path = exported(tmp_path, write_scalar_onnx)
    _yaml(folder, outputs=[{"name": "score", "dtype": "FP32", "dims": []}])
    with pytest.raises(ExportError, match=r"does not declare output 'doubled' of the new ONNX \(FP32 \[4\]\)"):
        check_model_yaml(folder, onnx_path)
    _yaml(folder, outputs=[{"name": "score", "dtype": "FP32", "dims": []},
                           {"name": "doubled", "dtype": "FP32", "dims": [4]}])
    check_model_yaml(folder, onnx_path)


def test_check_model_yaml_refuses_batching_a_model_whose_batch_axis_is_fixed(tmp_path):
    folder, onnx_path = exported(tmp_path, write_fixed_onnx)
    _yaml(folder, max_batch_size=64, dynamic_batching={"max_queue_delay_microseconds": 0})
    with pytest.raises(ExportError) as info:
        check_model_yaml(folder, onnx_path)
    assert "declares max_batch_size 64 but the new ONNX has no variable first (batch) axis on 'x' [1, 4], " \
           "'y' [1, 4]: set max_batch_size: 0 and remove dynamic_batching" in str(info.value)
    _yaml(folder, max_batch_size=0)
    check_model_yaml(folder, onnx_path)


def test_check_model_yaml_checks_what_padding_names(tmp_path):
    folder, onnx_path = exported(tmp_path, name="bert")
    shutil.copy(ROOT / "model_repository" / "bert" / "model.yaml", folder / "model.yaml")
    with pytest.raises(ExportError, match="pad_inputs names unknown input 'input_ids'"):
        check_model_yaml(folder, onnx_path)


@pytest.mark.parametrize(("text", "words"), [
    ("kind: python\nhook: h:H\nmax_batch_size: 4\ninputs: [{name: X, dtype: FP32, dims: [1]}]\n"
     "outputs: [{name: Y, dtype: FP32, dims: [1]}]\n", "says kind: python, but the export wrote an ONNX model"),
    ("kind: onnx\nmax_batchsize: 4\n", "field 'max_batchsize': unknown field (check its spelling); fix it, or "
                                       "remove it and the export writes a default one"),
    ("kind: onnx\nfile: other.onnx\n", "declares file: other.onnx but the export writes model.onnx"),
])
def test_check_model_yaml_refuses_a_yaml_that_cannot_serve_the_export(tmp_path, text, words):
    folder, onnx_path = exported(tmp_path)
    (folder / "model.yaml").write_text(text)
    with pytest.raises(ExportError) as info:
        check_model_yaml(folder, onnx_path)
    assert words in str(info.value)


def test_check_model_yaml_refuses_a_0d_tensor_without_a_batch_axis(tmp_path):
    folder = tmp_path / "models" / "m"
    _yaml(folder, max_batch_size=0)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "zero_d",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(folder / "model.onnx"))
    with pytest.raises(ExportError, match=r"model.yaml: 'x' of the new ONNX is a 0-d scalar \(shape \[\]\)"):
        check_model_yaml(folder, folder / "model.onnx")
    with pytest.raises(ExportError, match=r"model.onnx: 'x' of model.onnx is a 0-d scalar"):  # gen-repo would
        default_model_yaml(folder, folder / "model.onnx", COMMAND)
