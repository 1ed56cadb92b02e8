import time

from toolkit.hooks import Hook


class Sleepy(Hook):
    def init(self, ctx):
        self.sleep = float(ctx.parameters["sleep_ms"]) / 1000

    def infer(self, batch):
        time.sleep(self.sleep)
        return {"Y": batch["X"]}
