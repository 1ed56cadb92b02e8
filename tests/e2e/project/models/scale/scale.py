"""Test hook: Y = X * factor; BATCH = how many rows the infer call saw (to observe batching)."""

import time

import numpy as np

from toolkit.hooks import Hook, HookError


class Scale(Hook):
    api_path = "scale"

    def init(self, ctx):
        self.factor = float(ctx.parameters["factor"])
        self.delay = float(ctx.parameters.get("delay_ms", "0")) / 1000

    def api_entry(self, request):
        if np.any(request["X"] < 0):
            raise HookError(1001, "X must be non-negative")
        return request

    def infer(self, batch):
        x = batch["X"]
        if np.isnan(x).any():
            raise ValueError("NaN reached infer")
        if self.delay:
            time.sleep(self.delay)
        rows = x.shape[0]
        return {"Y": x * self.factor, "BATCH": np.full((rows, 1), rows, dtype=np.int32)}
