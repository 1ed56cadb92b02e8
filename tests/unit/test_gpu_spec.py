"""GPU in the spec: instance groups, accelerators, pinned memory, the fallback flag; rendered for both
targets and parsed with Triton's ModelConfig; the ONNX hook's providers; the serve-time GPU check."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from google.protobuf import text_format
from onnx_models import write_linear_onnx
from projects import python_model, write_model
from tritonclient.grpc import model_config_pb2

from toolkit.errors import RenderError, ServerError, SpecError
from toolkit.repository.generate import generate_repository
from toolkit.repository.project import load_project
from toolkit.repository.render import build_config_text
from toolkit.runtime.hooks import HookContext
from toolkit.runtime.onnx_hook import GpuUnavailable, confirm_gpu, execution_providers
from toolkit.server.gpus import GpuInventory, check_gpus, gpu_demands

GPU_GROUP = {"kind": "gpu", "gpus": [0, 1], "count": 2}
TRT = {"gpu_execution_accelerator": {"name": "tensorrt", "precision_mode": "FP16",
                                     "max_workspace_size_bytes": 1 << 30},
       "input_pinned_memory": True, "output_pinned_memory": False}


def onnx_project(tmp_path: Path, **spec) -> Path:
    root = tmp_path / "project"
    write_model(root, "linear", {"kind": "onnx", "max_batch_size": 8, **spec})
    write_linear_onnx(root / "models" / "linear" / "1" / "model.onnx")
    return root


def parsed(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def rendered(root: Path, target: str, name: str = "linear") -> model_config_pb2.ModelConfig:
    project = load_project(root / "models", root / "ensembles")
    return parsed(build_config_text(project.models[name], source_label="x", target=target))


def test_container_config_has_gpu_groups_the_tensorrt_accelerator_and_pinned_memory(tmp_path):
    config = rendered(onnx_project(tmp_path, instance_group=[GPU_GROUP, {"kind": "cpu"}], optimization=TRT),
                      "container")
    gpu, cpu = config.instance_group
    assert (gpu.kind, gpu.count, list(gpu.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 2, [0, 1])
    assert (cpu.kind, cpu.count, list(cpu.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1, [])
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt"
    assert dict(accelerator.parameters) == {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824"}
    assert config.optimization.input_pinned_memory.enable is True
    assert config.optimization.HasField("output_pinned_memory")
    assert config.optimization.output_pinned_memory.enable is False
    assert config.backend == "onnxruntime"


def test_cuda_accelerator_and_a_gpu_group_without_gpus_mean_every_gpu_on_the_container(tmp_path):
    config = rendered(onnx_project(tmp_path, instance_group={"kind": "gpu", "count": 3},
                                   optimization={"gpu_execution_accelerator": {"name": "cuda"}}), "container")
    (group,) = config.instance_group
    assert (group.kind, group.count, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, 3, [])
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "cuda" and not accelerator.parameters


def test_embedded_config_places_onnx_sessions_in_the_hook_one_device_per_instance(tmp_path):
    config = rendered(onnx_project(tmp_path, instance_group=[GPU_GROUP, {"kind": "cpu"}], optimization=TRT,
                                   allow_cpu_fallback=True), "embedded")
    assert [(g.kind, g.count) for g in config.instance_group] == [
        (model_config_pb2.ModelInstanceGroup.KIND_CPU, 4), (model_config_pb2.ModelInstanceGroup.KIND_CPU, 1)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["gpu.devices"] == "0,0,1,1,cpu"
    assert params["gpu.accelerator"] == "tensorrt"
    assert params["gpu.option.precision_mode"] == "FP16"
    assert params["gpu.allow_cpu_fallback"] == "true"
    assert not config.optimization.execution_accelerators.gpu_execution_accelerator  # no such backend here
    assert config.optimization.input_pinned_memory.enable is True


def test_a_python_models_gpu_group_is_tritons_own_on_both_targets(tmp_path):
    root = tmp_path / "project"
    write_model(root, "echo", {**python_model([("X", "FP32", [1])], [("Y", "FP32", [1])]),
                               "instance_group": {"kind": "gpu", "gpus": [1]}})
    for target in ("embedded", "container"):
        (group,) = rendered(root, target, "echo").instance_group
        assert (group.kind, list(group.gpus)) == (model_config_pb2.ModelInstanceGroup.KIND_GPU, [1])


def test_instance_count_alone_still_renders_that_many_cpu_instances(tmp_path):
    (group,) = rendered(onnx_project(tmp_path, instance_count=3), "container").instance_group
    assert (group.kind, group.count) == (model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)


@pytest.mark.parametrize(("spec", "says"), [
    ({"instance_group": {"kind": "tpu"}}, "field 'instance_group.0.kind': 'tpu' is not one of"),
    ({"instance_group": {"kind": "gpu", "gpus": [0, 0]}}, "field 'instance_group.0.gpus'"),
    ({"instance_group": {"kind": "gpu", "gpus": [-1]}}, "field 'instance_group.0.gpus'"),
    ({"instance_group": {"kind": "gpu", "gpus": []}}, "field 'instance_group.0.gpus'"),
    ({"instance_group": {"kind": "gpu", "gpus": "0"}}, "field 'instance_group.0.gpus'"),
    ({"instance_group": {"kind": "cpu", "gpus": [0]}}, "field 'instance_group.0.gpus': only a group of kind gpu"),
    ({"instance_group": {"kind": "gpu", "count": 0}}, "field 'instance_group.0.count'"),
    ({"instance_group": {"kind": "gpu", "cuont": 2}}, "field 'instance_group.0.cuont': unknown field"),
    ({"instance_group": {"kind": "gpu"}, "instance_count": 2}, "field 'instance_group': give either instance_count"),
    ({"instance_group": []}, "field 'instance_group': list at least one group"),
    ({"allow_cpu_fallback": True}, "field 'allow_cpu_fallback': says what to do when a GPU is missing"),
    ({"optimization": {"gpu_execution_accelerator": {"name": "cuda"}}},
     "field 'optimization.gpu_execution_accelerator': needs an instance_group of kind gpu"),
    ({"instance_group": {"kind": "gpu"}, "optimization": {"gpu_execution_accelerator": {"name": "openvino"}}},
     "field 'optimization.gpu_execution_accelerator.name'"),
    ({"instance_group": {"kind": "gpu"},
      "optimization": {"gpu_execution_accelerator": {"name": "tensorrt", "precision_mode": "FP8"}}},
     "field 'optimization.gpu_execution_accelerator.precision_mode'"),
    ({"instance_group": {"kind": "gpu"},
      "optimization": {"gpu_execution_accelerator": {"name": "cuda", "precision_mode": "FP16"}}},
     "field 'optimization.gpu_execution_accelerator.precision_mode': a TensorRT option (precision_mode); name: cuda"),
    ({"instance_group": {"kind": "gpu"},
      "optimization": {"gpu_execution_accelerator": {"name": "tensorrt", "max_workspace_size_bytes": 10}}},
     "field 'optimization.gpu_execution_accelerator.max_workspace_size_bytes'"),
    ({"instance_group": {"kind": "gpu"}, "optimization": {"input_pinned_memory": "sometimes"}},
     "field 'optimization.input_pinned_memory'"),
    ({"instance_group": {"kind": "gpu"}, "parameters": {"gpu.devices": "0"}},
     "field 'parameters': ['gpu.devices']: 'gpu.' keys are written by gen-repo"),
])
def test_malformed_gpu_fields_are_one_spec_error_naming_the_field(tmp_path, spec, says):
    root = onnx_project(tmp_path, **spec)
    with pytest.raises(SpecError) as info:
        load_project(root / "models", root / "ensembles")
    assert says in str(info.value) and "model 'linear'" in str(info.value)


def test_a_python_model_cannot_take_an_onnx_accelerator_or_fall_back(tmp_path):
    root = tmp_path / "project"
    base = {**python_model([("X", "FP32", [1])], [("Y", "FP32", [1])]), "instance_group": {"kind": "gpu"}}
    write_model(root, "echo", {**base, "allow_cpu_fallback": True})
    with pytest.raises(SpecError, match="only an onnx model can fall back"):
        load_project(root / "models", root / "ensembles")
    write_model(root, "echo", {**base, "optimization": {"gpu_execution_accelerator": {"name": "cuda"}}})
    with pytest.raises(SpecError, match="only an onnx model runs on onnxruntime's GPU accelerators"):
        load_project(root / "models", root / "ensembles")


def test_a_fused_ensemble_refuses_a_gpu_step(tmp_path):
    root = onnx_project(tmp_path, instance_group={"kind": "gpu"})
    (root / "ensembles").mkdir()
    (root / "ensembles" / "fast.yaml").write_text(
        "execution: fused\nmax_batch_size: 8\ninputs: [{name: x, dtype: FP32, dims: [4]}]\n"
        "outputs: [{name: y, dtype: FP32, dims: [2]}]\nsteps:\n- {model: linear, inputs: {x: x}, outputs: {y: y}}\n")
    project = load_project(root / "models", root / "ensembles")
    with pytest.raises(RenderError, match="cannot fuse step 'linear', whose instance_group is of kind gpu"):
        generate_repository(project, tmp_path / "repo")


def context(params: dict[str, str], index: int = 0) -> HookContext:
    return HookContext(model_name="bert", model_version=1, model_dir=Path("."), parameters=params,
                       instance_count=4, instance_index=index)


PLACED = {"gpu.devices": "0,1,cpu", "gpu.accelerator": "tensorrt", "gpu.option.precision_mode": "FP16",
          "gpu.option.max_workspace_size_bytes": "1073741824"}
GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_hook_asks_onnxruntime_for_tensorrt_then_cuda_on_the_instances_own_gpu():
    trt, cuda, cpu = execution_providers(ort, context(PLACED, index=1), GPU_PROVIDERS)
    assert trt == ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": True,
                                                 "trt_max_workspace_size": "1073741824"})
    assert cuda == ("CUDAExecutionProvider", {"device_id": 1}) and cpu == "CPUExecutionProvider"
    assert execution_providers(ort, context(PLACED, index=2), GPU_PROVIDERS) == ["CPUExecutionProvider"]
    assert execution_providers(ort, context({}), GPU_PROVIDERS) == ["CPUExecutionProvider"]


def test_hook_without_a_cuda_provider_fails_to_load_naming_onnxruntime_gpu_unless_fallback_allowed():
    cpu_only = ort.get_available_providers()  # this machine's onnxruntime: no CUDA
    assert "CUDAExecutionProvider" not in cpu_only
    with pytest.raises(GpuUnavailable, match=r"asks for GPU 0 .* no CUDAExecutionProvider .* onnxruntime-gpu"):
        execution_providers(ort, context(PLACED), cpu_only)
    fallback = {**PLACED, "gpu.allow_cpu_fallback": "true"}
    assert execution_providers(ort, context(fallback), cpu_only) == ["CPUExecutionProvider"]
    with pytest.raises(GpuUnavailable, match="no TensorrtExecutionProvider"):
        execution_providers(ort, context(PLACED), ["CUDAExecutionProvider", "CPUExecutionProvider"])


class _Session:
    def __init__(self, providers):
        self.providers = providers

    def get_providers(self):
        return self.providers


def test_a_session_that_onnxruntime_quietly_put_on_the_cpu_fails_the_load_unless_fallback_allowed():
    requested = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    on_gpu = _Session(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert confirm_gpu(on_gpu, requested, context(PLACED)) == requested
    with pytest.raises(GpuUnavailable, match="started its session with CPUExecutionProvider only"):
        confirm_gpu(_Session(["CPUExecutionProvider"]), requested, context(PLACED))
    fallback = context({**PLACED, "gpu.allow_cpu_fallback": "true"})
    assert confirm_gpu(_Session(["CPUExecutionProvider"]), requested, fallback) == ["CPUExecutionProvider"]


def gpu_repository(tmp_path: Path, **spec) -> Path:
    root = onnx_project(tmp_path, **spec)
    write_model(root, "echo", python_model([("X", "FP32", [1])], [("Y", "FP32", [1])]))
    return generate_repository(load_project(root / "models", root / "ensembles"), tmp_path / "repo").path


def test_serve_check_names_the_models_that_need_a_gpu_this_machine_lacks(tmp_path):
    repo = gpu_repository(tmp_path, instance_group={"kind": "gpu", "gpus": [1]})
    assert gpu_demands(repo, ["echo", "linear"]) == {"linear": {1}}
    none = GpuInventory(0, "nvidia-smi: not found; /proc/driver/nvidia/gpus: absent")
    with pytest.raises(ServerError, match=r"^linear: the spec asks for a GPU .* has no NVIDIA GPU \(nvidia-smi: not"):
        check_gpus(repo, ["echo", "linear"], none)
    with pytest.raises(ServerError, match=r"linear GPU 1: no such device, this machine has 1 GPU"):
        check_gpus(repo, ["linear"], GpuInventory(1, "nvidia-smi -L lists 1"))
    check_gpus(repo, ["linear"], GpuInventory(2, "nvidia-smi -L lists 2"))
    check_gpus(repo, ["echo"], none)  # a CPU model alone needs nothing


def test_serve_check_lets_an_onnx_model_that_allows_the_fallback_through(tmp_path):
    repo = gpu_repository(tmp_path, instance_group={"kind": "gpu"}, allow_cpu_fallback=True)
    assert gpu_demands(repo, ["echo", "linear"]) == {}
    check_gpus(repo, ["linear"], GpuInventory(0, "none"))
    container = generate_repository(load_project(tmp_path / "project" / "models", None), tmp_path / "c",
                                    target="container").path
    assert gpu_demands(container, ["linear"]) == {"linear": set()}  # Triton itself refuses KIND_GPU there
