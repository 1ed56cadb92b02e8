from toolkit.hooks import Hook


class RowSum(Hook):
    def infer(self, batch):
        return {"S": batch["V"].sum(axis=1, keepdims=True)}
