"""Golden samples: a few inputs and the outputs the *source* model gave for them, recorded by
``toolkit export`` into the version folder (``golden.npz``), so a rollout can prove that the
version it is about to serve computes what was exported before any traffic reaches it.

    golden.npz   input.<name> ...   the inputs of one check case (a batch)
                 output.<name> ...  the source model's outputs for them
                 tolerance, rel_tolerance   the export's own tolerances (scalars; tolerance inf: none)

A python hook's version folder may ship its own ``golden.npz`` (inputs and expected outputs of the
model as Triton serves it); ``toolkit rollout`` checks it the same way.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

GOLDEN_FILE = "golden.npz"


@dataclass(frozen=True)
class Golden:
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]
    tolerance: float
    rel_tolerance: float

    def describe(self) -> str:
        bound = f"{self.rel_tolerance:g} of each output's peak"
        return bound if not np.isfinite(self.tolerance) else f"{bound} and {self.tolerance:g} absolute"


def write_golden(path: Path, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                 tolerance: float | None, rel_tolerance: float) -> None:
    """``tolerance=None``: no absolute bound (stored as inf), only the relative one."""
    tolerance = np.inf if tolerance is None else tolerance
    arrays = {f"input.{k}": np.asarray(v) for k, v in inputs.items()}
    arrays.update({f"output.{k}": np.asarray(v) for k, v in outputs.items()})
    with open(path, "wb") as f:
        np.savez_compressed(f, tolerance=np.float64(tolerance), rel_tolerance=np.float64(rel_tolerance), **arrays)


def read_golden(path: Path) -> Golden:
    try:
        with np.load(path, allow_pickle=False) as data:
            inputs = {k[len("input."):]: data[k] for k in data.files if k.startswith("input.")}
            outputs = {k[len("output."):]: data[k] for k in data.files if k.startswith("output.")}
            tolerance = float(data["tolerance"]) if "tolerance" in data.files else 1e-4
            rel = float(data["rel_tolerance"]) if "rel_tolerance" in data.files else 1e-3
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        # np.load says "pickled data" of any file that is not an .npz archive (zip) or an .npy
        reason = "not an .npz archive" if "pickled" in str(e) else (str(e) or type(e).__name__)
        if isinstance(e, EOFError):
            reason = "the file is empty"
        raise ToolkitError(f"{path}: not a readable golden file ({reason}): is it corrupt or truncated? "
                           "`toolkit export` writes it again") from e
    if not inputs or not outputs:
        raise ToolkitError(f"{path}: a golden file needs input.* and output.* arrays")
    return Golden(inputs, outputs, tolerance, rel)


def compare_golden(golden: Golden, actual: Mapping[str, np.ndarray]) -> list[str]:
    """Every disagreement between ``actual`` and the recorded outputs, as readable lines (none: pass).

    An output fails when its max abs diff exceeds the tolerance, or exceeds ``rel_tolerance`` times
    the recorded output's peak magnitude (the export's own rule)."""
    problems = []
    for name, expected in golden.outputs.items():
        if name not in actual:
            problems.append(f"{name}: missing from the served outputs")
            continue
        got = np.asarray(actual[name])
        if got.shape != expected.shape:
            problems.append(f"{name}: shape {list(got.shape)}, recorded {list(expected.shape)}")
            continue
        if expected.dtype.kind in "fc":
            diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
            peak = float(np.max(np.abs(expected), initial=0.0))
            if not np.isfinite(diff) or diff > golden.tolerance or diff > golden.rel_tolerance * max(peak, 1e-30):
                problems.append(f"{name}: max abs diff {diff:.3g} (allowed: {golden.describe()}; peak {peak:.3g})")
        elif not np.array_equal(got, expected):
            problems.append(f"{name}: values differ from the recorded ones")
    return problems


def check_golden(golden: Golden, infer: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]]) -> list[str]:
    return compare_golden(golden, infer(golden.inputs))
