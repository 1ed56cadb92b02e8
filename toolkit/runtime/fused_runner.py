"""The runtime of ``execution: fused``: an ensemble's steps in one process (toolkit/repository/fused_plan.py plans it).

Each step keeps what it has as a model of its own: ``api_entry`` per request, its ``Layout`` (padding,
trimming, length buckets), its error codes. Between steps the requests' tensors stay numpy arrays
in this process instead of crossing to another stub. A request that fails a step gets that step's
``Failure`` and skips the steps after it; the others go on. Like ``batching.run_batch``, this is
plain Python without Triton's types, unit-tested without a server.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.runtime.batching import Failure, Layout, Observer, Result, run_batch
from toolkit.runtime.hooks import HookContext
from toolkit.runtime.occupancy import Occupancy
from toolkit.runtime.params import HOOK, config_parameters, hook_parameters

_NO_OBSERVER = Observer()


@dataclass
class FusedStep:
    model: str
    hook: Any
    layout: Layout
    inputs: dict[str, str]  # step tensor -> ensemble tensor
    outputs: dict[str, str]
    observer: Observer = _NO_OBSERVER


class FusedPipeline:
    def __init__(self, steps: list[FusedStep], outputs: list[str]):
        self.steps, self.outputs = steps, outputs

    @classmethod
    def load(cls, version_dir: Path, plan_file: str, *, instance_name: str = "", instance_count: int = 1,
             occupancy: Occupancy | None = None, observer: Callable[[str], Observer] | None = None
             ) -> FusedPipeline:
        """Build every step's hook from ``<version_dir>/<plan_file>`` and ``init`` it with its own
        folder and parameters, as its own model would be."""
        plan = json.loads((version_dir / plan_file).read_text(encoding="utf-8"))
        steps = []
        for step in plan["steps"]:
            folder = version_dir / step["folder"]
            config = step["config"]
            params = config_parameters(config)
            hook = load_hook(params[HOOK], folder, step["folder"])()
            layout = Layout.from_config(config)
            hook.init(HookContext(
                model_name=step["model"], model_version=int(step["version"]), model_dir=folder,
                parameters=hook_parameters(params),
                instance_name=instance_name, instance_count=instance_count, max_batch_size=layout.max_batch_size,
                occupancy=occupancy or Occupancy()))
            steps.append(FusedStep(step["model"], hook, layout, step["inputs"], step["outputs"],
                                   observer(step["model"]) if observer else _NO_OBSERVER))
        return cls(steps, list(plan["outputs"]))

    def run(self, requests: list[dict[str, np.ndarray]], log: Callable[[str], None] | None = None
            ) -> tuple[list[Result], dict[str, list[Result]]]:
        """One dynamic batch through every step: one result per request, in order, and each step's
        own results (for its metrics)."""
        tensors = [dict(r) for r in requests]
        failed: list[Failure | None] = [None] * len(requests)
        per_step: dict[str, list[Result]] = {}
        for step in self.steps:
            live = [i for i, f in enumerate(failed) if f is None]
            if not live:
                break
            # Tensors travel between steps as Triton's ensemble would pass them (a per-row scalar
            # output as [batch, 1]), and each step sees them as its own model would (Layout.*_api).
            batch = [{name: step.layout.input_from_api(name, tensors[i][source])
                      for name, source in step.inputs.items() if source in tensors[i]} for i in live]
            results = run_batch(step.hook, batch, step.layout, log=log, observer=step.observer)
            per_step[step.model] = results
            for i, result in zip(live, results, strict=True):
                if isinstance(result, Failure):
                    failed[i] = result
                    tensors[i] = {}  # free what it holds
                else:
                    for name, target in step.outputs.items():
                        tensors[i][target] = step.layout.output_to_api(name, result[name])
        return [f if f is not None else {name: tensors[i][name] for name in self.outputs}
                for i, f in enumerate(failed)], per_step

    def finalize(self) -> None:
        for step in self.steps:
            finalize = getattr(step.hook, "finalize", None)
            if finalize is not None:
                finalize()


def load_hook(ref: str, folder: Path, unique: str) -> type:
    """The hook class ``module:Class``: a module file in the step's ``folder`` is loaded under a name
    of its own (two steps may both ship a ``hooks.py``), anything else is imported as usual."""
    module_name, class_name = ref.split(":")
    local = folder / f"{module_name}.py"
    try:
        if "." not in module_name and local.is_file():
            if str(folder) not in sys.path:  # for the module's own sibling imports
                sys.path.append(str(folder))
            name = f"_toolkit_fused_{unique.replace('-', '_')}_{module_name}"
            spec = importlib.util.spec_from_file_location(name, local)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        return getattr(module, class_name)
    except (ImportError, AttributeError, SyntaxError) as e:
        raise RuntimeError(f"fused step '{unique}': cannot load hook {ref}: {type(e).__name__}: {e}") from e
