"""config.pbtxt rendering, Triton proto validation, and writing the repository."""

from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import pytest
from google.protobuf import text_format
from onnx_models import write_linear_onnx, write_scalar_onnx
from projects import python_model, write_model
from tritonclient.grpc import model_config_pb2

from toolkit.errors import RenderError, RepositoryError, SpecError
from toolkit.repository.generate import MARKER, generate_repository
from toolkit.repository.project import load_project
from toolkit.repository.render import build_config_text, make_environment

E2E_PROJECT = Path(__file__).parent.parent / "e2e" / "project"
GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def project_dir(tmp_path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(E2E_PROJECT, root)
    write_linear_onnx(root / "models" / "linear" / "1" / "model.onnx")
    return root


def load(root: Path):
    return load_project(root / "models", root / "ensembles")


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize(("name", "target", "golden"), [
    ("scale", "embedded", "scale.pbtxt"),
    ("linear", "embedded", "linear_embedded.pbtxt"),
    ("linear", "container", "linear_container.pbtxt"),
    ("ragged", "embedded", "ragged.pbtxt"),
    ("sleepy", "embedded", "sleepy.pbtxt"),
    ("pipeline", "embedded", "pipeline.pbtxt"),
])
def test_build_config_text_matches_golden_file(project_dir, name, target, golden):
    project = load(project_dir)
    source = project.models.get(name) or project.ensembles[name]
    text = build_config_text(source, source_label=f"spec of {name}", target=target)
    assert text == (GOLDEN / golden).read_text()


def test_rendered_config_round_trips_to_the_spec(project_dir):
    scale = load(project_dir).models["scale"]
    config = parse(build_config_text(scale, source_label="x"))
    spec = scale.spec
    assert config.name == "scale" and config.backend == "python" and config.max_batch_size == 32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("X", model_config_pb2.TYPE_FP32, [4])]
    assert [t.name for t in config.output] == [t.name for t in spec.outputs]
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 20000
    group = config.instance_group[0]
    assert group.count == 1 and group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.parameters["factor"].string_value == "2"
    assert config.parameters["toolkit.hook"].string_value == "scale:Scale"
    assert config.parameters["toolkit.api_path"].string_value == "scale"
    sleepy = parse(build_config_text(load(project_dir).models["sleepy"], source_label="x"))
    policy = sleepy.dynamic_batching.default_queue_policy
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
    assert policy.default_timeout_microseconds == 100000 and policy.max_queue_size == 4


def test_container_target_uses_triton_onnxruntime_backend(project_dir):
    config = parse(build_config_text(load(project_dir).models["linear"], source_label="x", target="container"))
    assert config.backend == "onnxruntime"
    assert "toolkit.hook" not in config.parameters


@pytest.mark.parametrize(("threads", "rendered"), [("3", "3"), ("adaptive", None)])
def test_container_target_passes_a_fixed_thread_count_and_leaves_adaptive_to_the_backend(
        project_dir, threads, rendered):
    model = load(project_dir).models["linear"]
    model.spec.parameters["intra_op_threads"] = threads
    config = parse(build_config_text(model, source_label="x", target="container"))
    assert "intra_op_threads" not in config.parameters
    got = config.parameters["intra_op_thread_count"].string_value if "intra_op_thread_count" in config.parameters \
        else None
    assert got == rendered


def _dims(tensors) -> dict[str, tuple[list[int], list[int] | None]]:
    """name -> (dims, reshape shape or None when the config has no reshape)."""
    return {t.name: (list(t.dims), list(t.reshape.shape) if t.HasField("reshape") else None) for t in tensors}


@pytest.mark.parametrize("target", ["embedded", "container"])
def test_a_per_row_scalar_renders_as_dims_1_reshaped_to_no_dims(tmp_path, target):
    folder = write_model(tmp_path, "scalar", {"kind": "onnx", "max_batch_size": 8})
    write_scalar_onnx(folder / "1" / "model.onnx")  # offset [batch], score [batch]
    text = build_config_text(load(tmp_path).models["scalar"], source_label="x", target=target)
    config = parse(text)  # build_config_text also proved it equal to the spec's ModelConfig
    assert _dims(config.input) == {"x": ([4], None), "offset": ([1], [])}
    assert _dims(config.output) == {"score": ([1], []), "doubled": ([4], None)}
    assert 'name: "score"\n  data_type: TYPE_FP32\n  dims: [ 1 ]\n  reshape: { shape: [ ] }\n}' in text
    assert config.backend == ("python" if target == "embedded" else "onnxruntime")


def test_a_python_models_per_row_scalar_renders_reshaped_too(tmp_path):
    write_model(tmp_path, "scale", python_model([("X", "FP32", [])], [("Y", "FP32", []), ("Z", "FP32", [2])]))
    config = parse(build_config_text(load(tmp_path).models["scale"], source_label="x"))
    assert _dims(config.input) == {"X": ([1], [])}
    assert _dims(config.output) == {"Y": ([1], []), "Z": ([2], None)}


def test_build_config_text_raises_render_error_when_template_drops_a_reshape(tmp_path):
    write_model(tmp_path, "scale", python_model([("X", "FP32", [])], [("Y", "FP32", [2])]))
    env = broken_env(tmp_path, "  reshape: {", "  # reshape: {")
    with pytest.raises(RenderError, match=r"differs from the spec:(.|\n)*reshape"):
        build_config_text(load(tmp_path).models["scale"], source_label="x", env=env)


def broken_env(tmp_path: Path, old: str, new: str):
    original = (Path(__file__).parents[2] / "toolkit" / "repository" / "templates" / "config.pbtxt.j2").read_text()
    assert old in original
    (tmp_path / "tpl").mkdir(exist_ok=True)
    (tmp_path / "tpl" / "config.pbtxt.j2").write_text(original.replace(old, new))
    return make_environment(tmp_path / "tpl")


def test_build_config_text_raises_render_error_when_template_writes_an_unknown_field(project_dir, tmp_path):
    env = broken_env(tmp_path, "max_batch_size: {{", "max_batch: {{")
    with pytest.raises(RenderError, match=r"model 'scale': rendered config.pbtxt is not a valid Triton "
                                          r"ModelConfig.*max_batch"):
        build_config_text(load(project_dir).models["scale"], source_label="x", env=env)


def test_build_config_text_raises_render_error_when_template_silently_drops_a_field(project_dir, tmp_path):
    env = broken_env(tmp_path, "  max_queue_delay_microseconds: {{ db.max_queue_delay_microseconds }}\n", "")
    with pytest.raises(RenderError, match=r"differs from the spec:(.|\n)*max_queue_delay_microseconds: 20000"):
        build_config_text(load(project_dir).models["scale"], source_label="x", env=env)


def test_generate_repository_writes_a_complete_layout(project_dir, tmp_path):
    out = tmp_path / "repo"
    report = generate_repository(load(project_dir), out)
    assert report.models["pipeline"] == "ensemble" and report.models["linear"] == "onnx"
    adapter = Path(__file__).parents[2] / "toolkit" / "runtime" / "adapter.py"
    assert filecmp.cmp(out / "scale" / "1" / "model.py", adapter, shallow=False)
    assert (out / "scale" / "1" / "scale.py").is_file()
    assert (out / "linear" / "1" / "model.onnx").is_file() and (out / "linear" / "1" / "model.py").is_file()
    assert (out / "pipeline" / "1").is_dir() and not any((out / "pipeline" / "1").iterdir())
    for config in out.glob("*/config.pbtxt"):
        parse(config.read_text())


def test_generate_repository_is_byte_identical_when_run_twice(project_dir, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    generate_repository(load(project_dir), first)
    generate_repository(load(project_dir), second)
    generate_repository(load(project_dir), second)  # replacing an existing repository
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def test_generate_repository_leaves_previous_repository_untouched_when_a_spec_is_bad(project_dir, tmp_path):
    out = tmp_path / "repo"
    generate_repository(load(project_dir), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    write_model(project_dir, "broken", python_model([("X", "FP32", [4])], [("Y", "FP33", [4])]))
    with pytest.raises(SpecError, match="broken"):
        generate_repository(load(project_dir), out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_generate_repository_cleans_up_and_keeps_old_output_when_writing_fails(project_dir, tmp_path):
    out = tmp_path / "repo"
    generate_repository(load(project_dir), out)
    (project_dir / "models" / "scale" / "model.py").write_text("# clashes with the adapter\n")
    with pytest.raises(RepositoryError, match=r"'model\.py' is reserved"):
        generate_repository(load(project_dir), out)
    assert (out / MARKER).is_file() and (out / "scale" / "config.pbtxt").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_generate_repository_refuses_to_replace_a_folder_it_did_not_write(project_dir, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(RepositoryError, match="was not written by `toolkit gen-repo`"):
        generate_repository(load(project_dir), out)
    assert (out / "notes.txt").read_text() == "keep me"
