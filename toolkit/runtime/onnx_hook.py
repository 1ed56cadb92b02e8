"""The built-in hook that runs an ONNX file with onnxruntime: one ``run`` per dynamic batch.

The embedded tritonserver has only the python backend, so on that target every ``kind: onnx`` model
is this hook behind the fixed adapter. Threads: onnxruntime's intra-op pool is sized
``cores // instance_count`` (parameter ``intra_op_threads`` overrides), and the inter-op pool is 1,
so the instances Triton runs side by side do not oversubscribe the cores.
"""

from __future__ import annotations

import os

import numpy as np

from toolkit.hooks import Hook, HookContext


def default_threads(instance_count: int) -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, instance_count))


class OnnxModel(Hook):
    def init(self, ctx: HookContext) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(ctx.parameters.get("intra_op_threads")
                                           or default_threads(ctx.instance_count))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning worker threads would burn the cores the other steps' processes, Triton and the
        # clients need between runs; in a multi-process server they must sleep instead.
        if ctx.parameters.get("spin_threads", "false").lower() != "true":
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = ctx.model_dir / ctx.parameters.get("onnx_file", "model.onnx")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: batch[name] for name in self.input_names if name in batch}
        return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
