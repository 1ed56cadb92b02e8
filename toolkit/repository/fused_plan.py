"""``execution: fused``: an ensemble served as ONE python model that runs its steps' hooks in one process.

This module plans it at gen-repo time (fused.json and the config); ``toolkit.runtime.fused_runner``
runs the plan inside the stub.

An ensemble step costs a hand-off between processes (the request's tensors through shared memory
to the step's stub and back) plus Triton's ensemble scheduling, per step and per request. A fused
ensemble keeps the same inputs, outputs and error codes, and runs in its model's stub:

    for each step, in dependency order:
        api_entry per request           (the step's own validation and codes)
        group, pad, bucket, infer       (the step's own pad_inputs / trim_outputs / bucket_call_cost)
        split back per request          (a request that failed a step skips the rest)

What gen-repo writes for it (``<out>/<ensemble>/``):

    config.pbtxt          backend python; the ensemble's inputs and outputs; instances and batcher
                          from ``fused:`` (default: the busiest step's instance count, the entry
                          step's batcher)
    1/model.py            the usual adapter; ``toolkit.fused`` points it at fused.json
    1/fused.json          the steps in dependency order: model, version, folder, tensor maps, and
                          each step's own config (what its config.pbtxt would hold)
    1/<i>-<model>/        each step's version folder as gen-repo writes it (hook modules, assets,
                          model.onnx)

Trade-offs, by design: the steps scale together (one instance runs the whole chain), a step's
version is the one present at gen-repo time (``toolkit rollout`` of a step model does not reach a
fused copy: regenerate, or keep ``execution: ensemble`` for steps that roll out on their own), and
on the container target an ONNX step runs in Triton's onnxruntime backend, so it cannot be fused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from toolkit.errors import RenderError
from toolkit.repository.dag import step_order
from toolkit.repository.project import EnsembleSource, ModelSource
from toolkit.repository.render import Target, batching_config, model_config, tensor_config
from toolkit.repository.spec import FusedOptions, check_onnx_parameters
from toolkit.repository.versions import write_version
from toolkit.runtime.params import API_PATH, FUSED, PAD_PREFIX

FUSED_FILE = "fused.json"


def fused_plan(ens: EnsembleSource, models: Mapping[str, ModelSource], target: Target) -> dict[str, Any]:
    """The steps as the runtime reads them from fused.json (refusing what cannot be fused)."""
    spec = ens.spec
    steps = []
    for i in step_order(spec):
        step = spec.steps[i]
        source = models[step.model]  # check_fusable refused ensembles as steps
        if source.spec.kind == "onnx" and target == "container":
            raise RenderError(f"ensemble '{spec.name}' ({ens.file}): execution: fused cannot fuse step "
                              f"'{step.model}' on the container target, where ONNX models run in Triton's "
                              "onnxruntime backend; use execution: ensemble for that target")
        if source.spec.on_gpu:
            raise RenderError(f"ensemble '{spec.name}' ({ens.file}): execution: fused cannot fuse step "
                              f"'{step.model}', whose instance_group is of kind gpu (the fused model's instances "
                              "run every step); use execution: ensemble")
        version = max(source.versions) if step.version == -1 else step.version
        if version not in source.versions:
            raise RenderError(f"ensemble '{spec.name}': step '{step.model}' asks for version {version}, but "
                              f"it has {source.versions}")
        config = model_config(source, "embedded")
        overrides = spec.fused.step_parameters.get(step.model, {}) if spec.fused else {}
        if source.spec.kind == "onnx":
            try:
                check_onnx_parameters(overrides, f"fused.step_parameters.{step.model}")
            except ValueError as e:
                raise RenderError(f"ensemble '{spec.name}' ({ens.file}): {e}") from None
        config["parameters"].update({k: {"string_value": v} for k, v in overrides.items()})
        steps.append({"model": step.model, "version": version, "folder": f"{len(steps)}-{step.model}",
                      "inputs": dict(step.inputs), "outputs": dict(step.outputs), "config": config})
    return {"ensemble": spec.name, "outputs": [t.name for t in spec.outputs], "steps": steps}


def fused_config(ens: EnsembleSource, models: Mapping[str, ModelSource], plan: Mapping[str, Any]) -> dict[str, Any]:
    """The fused model's Triton configuration (protobuf-shaped dict, as ``render.model_config``)."""
    spec = ens.spec
    instance_count, batching = (spec.fused or FusedOptions()).resolved([models[s["model"]].spec for s in plan["steps"]])
    params = dict(spec.parameters)
    params[FUSED] = FUSED_FILE
    if ens.api_path:
        params[API_PATH] = ens.api_path
    ragged = {ens_tensor for s in plan["steps"] for model_tensor, ens_tensor in s["inputs"].items()
              if PAD_PREFIX + model_tensor in s["config"]["parameters"]}
    inputs = [tensor_config(t) for t in spec.inputs]
    for tensor in inputs:
        if tensor["name"] in ragged:
            tensor["allow_ragged_batch"] = True
    return {
        "name": spec.name,
        "max_batch_size": spec.max_batch_size,
        "version_policy": {"latest": {"num_versions": 1}},
        "input": inputs,
        "output": [tensor_config(t) for t in spec.outputs],
        "instance_group": [{"count": instance_count, "kind": "KIND_CPU"}],
        "dynamic_batching": batching_config(batching),
        "backend": "python",
        "parameters": {k: {"string_value": v} for k, v in sorted(params.items())},
    }


def write_fused_version(plan: Mapping[str, Any], models: Mapping[str, ModelSource], folder: Path,
                        adapter: Path) -> None:
    """``<folder>/1/``: the adapter, fused.json and every step's version folder."""
    version_dir = folder / "1"
    version_dir.mkdir()
    for step in plan["steps"]:
        write_version(models[step["model"]], step["version"], version_dir / step["folder"], "embedded",
                      adapter=False)
    (version_dir / FUSED_FILE).write_text(json.dumps(plan, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    (version_dir / "model.py").write_bytes(adapter.read_bytes())
