import time

import numpy as np

from toolkit.hooks import Hook


class Ragged(Hook):
    def init(self, ctx):
        self.delay = float(ctx.parameters.get("delay_ms", "0")) / 1000

    def infer(self, batch):
        tokens = batch["TOKENS"]
        time.sleep(self.delay)
        width = np.full((tokens.shape[0], 1), tokens.shape[1], dtype=np.int64)
        return {"ECHO": tokens.copy(), "WIDTH": width}
