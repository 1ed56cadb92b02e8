import numpy as np

from toolkit.hooks import Hook


class Concat(Hook):
    def infer(self, batch):
        return {"C": np.concatenate([batch["A"], batch["B"]], axis=1)}
