"""Write small projects (model folders + ensemble files) into a temporary folder for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PASSTHROUGH_HOOK = '''
from toolkit.hooks import Hook


class Passthrough(Hook):
    api_path = "passthrough"

    def infer(self, batch):
        return {out: batch[inp] for inp, out in zip(sorted(batch), self.outputs)}

    def init(self, ctx):
        self.outputs = sorted(ctx.parameters.get("outputs", "Y").split(","))
'''


def python_model(inputs: list[tuple[str, str, list[int]]], outputs: list[tuple[str, str, list[int]]],
                 **extra: Any) -> dict[str, Any]:
    return {"kind": "python", "hook": "hook:Passthrough", "max_batch_size": 8,
            "inputs": [{"name": n, "dtype": t, "dims": d} for n, t, d in inputs],
            "outputs": [{"name": n, "dtype": t, "dims": d} for n, t, d in outputs], **extra}


def write_model(root: Path, name: str, spec: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    if spec.get("kind") == "python" and files is None:
        files = {"hook.py": PASSTHROUGH_HOOK}
    for rel, text in (files or {}).items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    return folder


def write_ensemble(root: Path, name: str, spec: dict[str, Any]) -> Path:
    folder = root / "ensembles"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
