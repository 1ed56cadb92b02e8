"""The toolkit's Triton python-backend adapter, copied verbatim into every python model's version folder.

It never changes per model: what differs travels in the config ``parameters`` (the hook class in
``toolkit.hook``, padding in ``toolkit.pad.*`` / ``toolkit.trim.*``). It loads the user's hook,
turns Triton requests into numpy dicts, hands one dynamic batch to ``toolkit.runtime.batching``,
and returns exactly one response per request: outputs, or an error carrying ``[code] message``.
"""

import importlib
import json
import os
import sys
from pathlib import Path

import triton_python_backend_utils as pb_utils

from toolkit.runtime.batching import Failure, Layout, Observer, run_batch
from toolkit.runtime.hooks import HookContext
from toolkit.runtime.occupancy import for_instance, instance_slot
from toolkit.runtime.params import FUSED, HOOK, config_parameters, hook_parameters


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.logger = pb_utils.Logger
        self.name = args["model_name"]
        version_dir = Path(args["model_repository"]) / args["model_version"]
        # The hook's own modules and assets sit beside this file.
        if str(version_dir) not in sys.path:
            sys.path.insert(0, str(version_dir))
        self.layout = Layout.from_config(config)
        self.input_names = list(self.layout.inputs)

        params = config_parameters(config)
        groups = config.get("instance_group") or [{}]
        instance_count = max(1, sum(int(g.get("count", 1)) for g in groups))
        # Who else of this model is executing (ctx.occupancy): the ONNX hook's adaptive threads.
        self.occupancy = for_instance(self.name, args["model_version"], args.get("model_instance_name", ""),
                                      groups)
        self.fused = self.metrics = None
        if FUSED in params:  # execution: fused - the ensemble's steps in this process
            from toolkit.runtime.fused_runner import FusedPipeline

            families = {}
            self.fused = FusedPipeline.load(
                version_dir, params[FUSED], instance_name=args.get("model_instance_name", ""),
                instance_count=instance_count, occupancy=self.occupancy,
                observer=lambda step: _metrics(f"{self.name}/{step}", args["model_version"], self.logger,
                                               families) or Observer())
            self.logger.log_info(f"model '{self.name}': fused steps {[s.model for s in self.fused.steps]} "
                                 f"ready (pid {os.getpid()})")
            return
        module_name, class_name = params[HOOK].split(":")
        try:
            hook_class = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as e:
            raise pb_utils.TritonModelException(
                f"model '{self.name}': cannot load hook {params[HOOK]}: {type(e).__name__}: {e}") from e
        self.hook = hook_class()
        ctx = HookContext(
            model_name=self.name,
            model_version=int(args["model_version"]),
            model_dir=version_dir,
            parameters=hook_parameters(params),
            instance_name=args.get("model_instance_name", ""),
            instance_count=instance_count,
            instance_index=(instance_slot(args.get("model_instance_name", ""), groups) or (0, 0))[0],
            max_batch_size=self.layout.max_batch_size,
            occupancy=self.occupancy,
        )
        self.hook.init(ctx)
        self.metrics = _metrics(self.name, args["model_version"], self.logger)
        self.logger.log_info(f"model '{self.name}' v{ctx.model_version}: hook {params[HOOK]} ready "
                             f"(pid {os.getpid()}, max_batch_size {ctx.max_batch_size})")

    def execute(self, requests):
        batch = []
        for request in requests:
            inputs = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:  # optional inputs may be absent
                    inputs[name] = tensor.as_numpy()
            batch.append(inputs)
        with self.occupancy.busy():  # the whole batch: a fused step's peers see it busy throughout
            if self.fused is not None:
                results, per_step = self.fused.run(batch, log=self.logger.log_error)
            else:
                results = run_batch(self.hook, batch, self.layout, log=self.logger.log_error,
                                    observer=self.metrics or Observer())
        if self.fused is not None:
            for step in self.fused.steps:
                flush = getattr(step.observer, "flush", None)  # metrics, when on
                if flush is not None and step.model in per_step:
                    flush(per_step[step.model])
        responses = []
        for result in results:
            if isinstance(result, Failure):
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_triton_error(result)))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(n, a) for n, a in result.items()]))
        if self.fused is None and self.metrics is not None:
            self.metrics.flush(results)
        return responses

    def finalize(self):
        self.occupancy.close()
        from toolkit.runtime.metrics import drain

        drain()  # the last batches' metric updates, before the model's metrics go (no-op without any)
        if self.fused is not None:
            self.fused.finalize()
            return
        finalize = getattr(self.hook, "finalize", None)
        if finalize is not None:
            finalize()


def _triton_error(failure):
    """A hook's deliberate rejection is the caller's fault (INVALID_ARG: HTTP 400 / gRPC
    INVALID_ARGUMENT); a crash is the server's (INTERNAL: HTTP 500 / gRPC INTERNAL)."""
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if failure.invalid_input else "INTERNAL", None)
    if code is None:  # a python backend older than 23.xx: no codes
        return pb_utils.TritonError(failure.wire_message())
    return pb_utils.TritonError(failure.wire_message(), code)


def _metrics(model, version, logger, families=None):
    """The hook's Prometheus metrics (toolkit/runtime/metrics.py), or None where the python backend
    has no custom metrics (older than 23.xx) or metrics are off."""
    if not hasattr(pb_utils, "MetricFamily"):
        logger.log_warn(f"model '{model}': this python backend has no custom metrics")
        return None
    from toolkit.runtime.metrics import HookMetrics

    try:
        return HookMetrics(pb_utils, model, version, log=logger.log_warn, families=families)
    except Exception as e:  # e.g. tritonserver started with --allow-metrics=false
        logger.log_warn(f"model '{model}': hook metrics unavailable: {type(e).__name__}: {e}")
        return None
