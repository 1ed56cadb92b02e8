"""What an export produced, in a form both the CLI and ``export.json`` can show.

Kept free of TensorFlow so that ``from toolkit.export import ExportReport`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TensorInfo:
    """One ONNX graph input or output as Triton sees it: name, ONNX dtype name and dims.

    ``shape`` uses ``-1`` for a dynamic dimension (Triton's spelling); ``dim_names`` keeps the
    ONNX symbolic names (``batch``, ``sequence``) for readers of ``export.json``.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    dim_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dim_names": list(self.dim_names)}

    def __str__(self) -> str:
        dims = ", ".join(n or str(d) for d, n in zip(self.shape, self.dim_names or [""] * len(self.shape),
                                                     strict=True))
        return f"{self.name} {self.dtype} [{dims}]"


@dataclass(frozen=True)
class CheckResult:
    """onnxruntime versus the source model on generated inputs.

    ``max_abs_diff`` is over every output and every case; ``per_output`` breaks it down;
    ``peak_abs`` is the largest reference magnitude per output, so a reader can tell whether a
    small difference is small *relative to the values* (an untrained CNN outputs ~1e-11).
    """

    max_abs_diff: float
    per_output: dict[str, float]
    peak_abs: dict[str, float]
    cases: list[str]
    tolerance: float
    rel_tolerance: float
    #: The first case's inputs and the source model's outputs for them (written to golden.npz).
    golden_inputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    golden_outputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "max_abs_diff_per_output": self.per_output,
                "peak_abs_per_output": self.peak_abs, "cases": self.cases,
                "tolerance": self.tolerance, "rel_tolerance": self.rel_tolerance}


@dataclass
class ExportReport:
    """The result of ``export_bert`` / ``export_keras``; ``metadata`` is what ``export.json`` holds."""

    kind: str
    source: str
    version_dir: Path
    model_path: Path
    metadata_path: Path
    files: list[Path]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    check: CheckResult
    opset: int
    timings: dict[str, float] = field(default_factory=dict)
    ignored_weights: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: ``--quantize``: the accuracy gate's summary line.
    quantization: str | None = None

    @property
    def max_abs_diff(self) -> float:
        return self.check.max_abs_diff

    @property
    def total_seconds(self) -> float:
        return sum(self.timings.values())

    def summary_lines(self) -> list[str]:
        """Human-readable lines for the CLI; every number a user would ask about after an export."""
        lines = [
            f"Exported {self.kind} model from {self.source}",
            f"  version folder : {self.version_dir}",
            f"  files          : {', '.join(p.name for p in self.files)}",
            f"  opset          : {self.opset}",
        ]
        lines += [f"  input          : {t}" for t in self.inputs]
        lines += [f"  output         : {t}" for t in self.outputs]
        cases = "; ".join(self.check.cases)
        lines.append(f"  onnxruntime vs source: max abs diff {self.check.max_abs_diff:.3g} "
                     f"(tolerance {self.check.tolerance:g}, rel {self.check.rel_tolerance:g}) "
                     f"over {len(self.check.cases)} cases: {cases}")
        for name, diff in self.check.per_output.items():
            lines.append(f"    {name}: max abs diff {diff:.3g}, peak |value| {self.check.peak_abs[name]:.3g}")
        if self.quantization:
            lines.append(self.quantization)
        if self.ignored_weights:
            shown = ", ".join(self.ignored_weights[:6])
            more = f" (+{len(self.ignored_weights) - 6} more)" if len(self.ignored_weights) > 6 else ""
            lines.append(f"  ignored on purpose: {len(self.ignored_weights)} weights: {shown}{more}")
        lines.append("  timings        : " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
                     + f" (total {self.total_seconds:.1f}s)")
        return lines
