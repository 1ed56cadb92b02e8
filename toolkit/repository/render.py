"""Spec -> config.pbtxt, rendered with jinja2 and proven against Triton's real ModelConfig.

``model_config`` builds the configuration as a dict shaped like Triton's protobuf (the PyTriton way).
The jinja2 template turns that dict into the readable config.pbtxt that lands in the repository.
``validate_config`` then parses the rendered text with ``tritonclient``'s ``ModelConfig`` (Triton's
own schema) and compares it with the dict parsed independently: a template mistake is caught
whether it breaks the syntax (an unknown field, a bad enum) or silently drops or alters a field.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import jinja2
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from toolkit.errors import RenderError
from toolkit.repository.placement import hook_device_parameters, instance_groups_config, optimization_config
from toolkit.repository.project import EnsembleSource, ModelSource
from toolkit.runtime.params import (
    ADAPTIVE,
    API_PATH,
    BUCKET_COST,
    BUCKET_ROWS,
    HOOK,
    ONNX_HOOK,
    PAD_PREFIX,
    SERVING_KEY,
    TRIM_PREFIX,
    read_export,
)

Target = Literal["embedded", "container"]
TARGETS: tuple[str, ...] = ("embedded", "container")
TEMPLATE_DIR = Path(__file__).parent / "templates"


def tensor_config(t) -> dict[str, Any]:
    out = {"name": t.name, "data_type": "TYPE_STRING" if t.dtype == "BYTES" else f"TYPE_{t.dtype}",
           "dims": t.api_dims}
    if not t.dims:  # one value per batch row: Triton needs a dim, the model sees [batch]
        out["reshape"] = {"shape": []}
    if t.optional:
        out["optional"] = True
    return out


def batching_config(db) -> dict[str, Any]:
    """A spec's ``dynamic_batching`` as Triton's DynamicBatching message."""
    batching: dict[str, Any] = {
        "preferred_batch_size": list(db.preferred_batch_size),
        "max_queue_delay_microseconds": db.max_queue_delay_microseconds,
        "preserve_ordering": db.preserve_ordering,
    }
    if db.default_queue_policy is not None:
        batching["default_queue_policy"] = db.default_queue_policy.model_dump()
    return batching


def _version_policy(vp) -> dict[str, Any]:
    if vp.latest is not None:
        return {"latest": {"num_versions": vp.latest}}
    if vp.all:
        return {"all": {}}
    return {"specific": {"versions": sorted(vp.specific)}}


def model_config(source: ModelSource | EnsembleSource, target: Target = "embedded") -> dict[str, Any]:
    """The model's Triton configuration as a protobuf-shaped dict (field names as in the proto)."""
    spec = source.spec
    params: dict[str, str] = dict(spec.parameters)
    config: dict[str, Any] = {
        "name": spec.name,
        "max_batch_size": spec.max_batch_size,
        "version_policy": _version_policy(spec.version_policy),
        "input": [tensor_config(t) for t in spec.inputs],
        "output": [tensor_config(t) for t in spec.outputs],
        "instance_group": [],
    }
    if source.api_path:
        params[API_PATH] = source.api_path

    if isinstance(source, EnsembleSource):
        if spec.execution == "fused":
            raise RenderError(f"ensemble '{spec.name}' has execution: fused: render it with "
                              "toolkit.repository.fused_plan")
        config["platform"] = "ensemble"
        config["ensemble_scheduling"] = {"step": [
            {"model_name": s.model, "model_version": s.version,
             "input_map": dict(s.inputs), "output_map": dict(s.outputs)} for s in spec.steps]}
    else:
        native = spec.kind == "python" or target == "container"  # else the ONNX hook places its sessions
        config["instance_group"] = instance_groups_config(spec.groups, native_gpu=native)
        if spec.dynamic_batching is not None:
            config["dynamic_batching"] = batching_config(spec.dynamic_batching)
        optimization = optimization_config(spec.optimization, accelerators=spec.kind == "onnx" and native)
        if optimization:
            config["optimization"] = optimization
        if spec.kind == "onnx" and target == "container":
            # Triton's own onnxruntime backend; it batches only requests of equal shape.
            config["backend"] = "onnxruntime"
            if spec.file != "model.onnx":
                config["default_model_filename"] = spec.file
            threads = params.pop("intra_op_threads", None)
            # "adaptive" is the embedded hook's (runtime/onnx_hook.py): the backend keeps its default.
            if threads is not None and threads.strip().lower() != ADAPTIVE:
                params["intra_op_thread_count"] = threads
            level = triton_graph_level(source)
            if level is not None:  # an onnxruntime optimizer bug the export found (toolkit.export.verify)
                config["optimization"] = {"graph": {"level": level}, **optimization}
        else:
            # The embedded server has only the python backend: the fixed adapter runs the hook,
            # and an ONNX model runs in the built-in onnxruntime hook.
            config["backend"] = "python"
            params[HOOK] = spec.hook if spec.kind == "python" else ONNX_HOOK
            if spec.kind == "onnx":
                params["onnx_file"] = spec.file
                params.update(hook_device_parameters(spec.groups, spec.optimization, spec.allow_cpu_fallback))
            for name, value in spec.pad_inputs.items():
                params[PAD_PREFIX + name] = repr(value)
            # Without it Triton's batcher only groups requests of equal shape, and nothing gets padded.
            for tensor in config["input"]:
                if tensor["name"] in spec.pad_inputs:
                    tensor["allow_ragged_batch"] = True
            for name, like in spec.trim_outputs.items():
                params[TRIM_PREFIX + name] = like
            if spec.bucket_call_cost:
                params[BUCKET_COST] = repr(float(spec.bucket_call_cost))
            if spec.bucket_rows:
                params[BUCKET_ROWS] = "true"
    config["parameters"] = {k: {"string_value": v} for k, v in sorted(params.items())}
    return config


def triton_graph_level(source: ModelSource) -> int | None:
    """The onnxruntime backend's graph level that every served version's export check allows
    (export.json ``onnxruntime.triton_graph_level``: -1 basic, 1 extended, 2 none); None: all."""
    strictness = {None: 0, 1: 1, -1: 2, 2: 3}
    level = None
    for version in source.versions:
        serving = read_export(source.folder / str(version)).get(SERVING_KEY)
        found = serving.get("triton_graph_level") if isinstance(serving, dict) else None
        if isinstance(found, int) and found in strictness and strictness[found] > strictness[level]:
            level = found
    return level


def _quote(value: Any) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def make_environment(template_dir: Path = TEMPLATE_DIR) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir)), undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, autoescape=False)
    env.filters["q"] = _quote
    return env


def render_config(config: dict[str, Any], *, source: str, target: Target,
                  env: jinja2.Environment | None = None) -> str:
    env = env or make_environment()
    try:
        return env.get_template("config.pbtxt.j2").render(c=config, source=source, target=target)
    except jinja2.TemplateError as e:
        raise RenderError(f"model '{config['name']}': template error: {e}") from e


def validate_config(text: str, expected: dict[str, Any]) -> model_config_pb2.ModelConfig:
    """Parse ``text`` as Triton's ModelConfig and require it to say exactly what ``expected`` says."""
    name = expected.get("name", "?")
    parsed = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, parsed)
    except text_format.ParseError as e:
        raise RenderError(f"model '{name}': rendered config.pbtxt is not a valid Triton ModelConfig: {e}"
                          ) from e
    reference = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(expected, reference)
    except json_format.ParseError as e:
        raise RenderError(f"model '{name}': configuration does not fit Triton's ModelConfig: {e}") from e
    if parsed != reference:
        diff = "\n".join(difflib.unified_diff(
            text_format.MessageToString(reference).splitlines(),
            text_format.MessageToString(parsed).splitlines(), "spec", "rendered", lineterm=""))
        raise RenderError(f"model '{name}': rendered config.pbtxt differs from the spec:\n{diff}")
    return parsed


def build_config_text(source: ModelSource | EnsembleSource, *, source_label: str,
                      target: Target = "embedded", env: jinja2.Environment | None = None,
                      config: dict[str, Any] | None = None) -> str:
    """Render and validate one model's config.pbtxt (``config``: built already, e.g. a fused ensemble's)."""
    config = config if config is not None else model_config(source, target)
    text = render_config(config, source=source_label, target=target, env=env)
    validate_config(text, config)
    return text
