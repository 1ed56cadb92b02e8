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
    """onnxruntime versus the source model on generated inputs (``toolkit.export.verify``).

    ``max_abs_diff`` is over every output and every case; ``per_output`` breaks it down,
    ``rel_per_output`` relative to ``peak_abs`` (the largest reference magnitude per output).
    ``spread`` is how much each output varies across the check inputs, relative to its peak;
    ``discriminating`` says whether that is enough for the check to tell a right model from one
    that ignores its input. ``serving`` is what the served onnxruntime session needs (empty: nothing
    special); ``probes`` the extra tensors checked because an output did not discriminate.
    """

    max_abs_diff: float
    per_output: dict[str, float]
    peak_abs: dict[str, float]
    cases: list[str]
    tolerance: float | None
    rel_tolerance: float
    rel_per_output: dict[str, float] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    discriminating: dict[str, bool] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    probes: dict[str, str] = field(default_factory=dict)
    #: The largest case's inputs and the source model's outputs for them (written to golden.npz).
    golden_inputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    golden_outputs: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def outputs(self) -> list[str]:
        return [n for n in self.per_output if n not in self.probes]

    @property
    def blind_outputs(self) -> list[str]:
        """Outputs that do not vary enough across the check inputs to tell two models apart."""
        return [n for n in self.outputs if not self.discriminating.get(n, True)]

    def to_dict(self) -> dict[str, Any]:
        data = {"max_abs_diff": self.max_abs_diff, "max_abs_diff_per_output": self.per_output,
                "max_rel_diff_per_output": self.rel_per_output, "peak_abs_per_output": self.peak_abs,
                "spread_per_output": self.spread, "discriminating": self.discriminating,
                "cases": self.cases, "tolerance": self.tolerance, "rel_tolerance": self.rel_tolerance}
        if self.probes:
            data["probes"] = self.probes
        if self.serving:
            data["onnxruntime"] = self.serving  # onnx_hook.SERVING_KEY (not imported: it brings numpy)
        return data

    def summary_lines(self) -> list[str]:
        tolerance = f"rel {self.rel_tolerance:g}" + (f", abs {self.tolerance:g}" if self.tolerance is not None else "")
        lines = [f"  onnxruntime vs source ({tolerance}) over {len(self.cases)} cases: {'; '.join(self.cases)}"]
        for name, diff in self.per_output.items():
            what = f"probe {self.probes[name]}" if name in self.probes else name
            mark = "" if self.discriminating.get(name, True) else "  NOT DISCRIMINATING"
            lines.append(f"    {what}: max abs diff {diff:.3g} ({self.rel_per_output.get(name, 0.0):.2g} of peak "
                         f"{self.peak_abs[name]:.3g}), varies {self.spread.get(name, 0.0):.2g} across inputs{mark}")
        if self.serving:
            fix = (f"served with {', '.join(self.serving['disabled_optimizers'])} disabled"
                   if self.serving.get("disabled_optimizers")
                   else f"served at {self.serving.get('graph_optimization_level')}")
            lines.append(f"  WARNING: {self.serving.get('optimizer_bug')}; {fix} (export.json 'onnxruntime'; "
                         f"container: graph level {self.serving.get('triton_graph_level')})")
        if self.blind_outputs:
            lines.append(f"  WARNING: {', '.join(self.blind_outputs)} hardly vary across the check inputs "
                         "(an untrained head?): " + ("the probes above were checked instead" if self.probes else
                                                    "this check cannot tell a right model from a wrong one")
                         + "; no golden.npz was written")
        return lines


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
    #: The model.yaml the export wrote beside the version folder (None: one was there, and matched).
    model_yaml: Path | None = None

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
        if self.metadata.get("checkpoint"):  # a Google BERT folder: which of its checkpoints, and why
            others = [n for n in self.metadata.get("checkpoints_in_folder", []) if n != self.metadata["checkpoint"]]
            lines.append(f"  checkpoint     : {self.metadata['checkpoint']} ({self.metadata['checkpoint_from']}"
                         + (f"; also in the folder: {', '.join(others)}" if others else "") + ")")
        lines += [f"  input          : {t}" for t in self.inputs]
        lines += [f"  output         : {t}" for t in self.outputs]
        lines += self.check.summary_lines()
        if self.quantization:
            lines.append(self.quantization)
        if self.ignored_weights:
            shown = ", ".join(self.ignored_weights[:6])
            more = f" (+{len(self.ignored_weights) - 6} more)" if len(self.ignored_weights) > 6 else ""
            lines.append(f"  ignored on purpose: {len(self.ignored_weights)} weights: {shown}{more}")
        if self.model_yaml is not None:
            lines.append(f"  model.yaml     : wrote {self.model_yaml} (edit it, then `toolkit gen-repo`)")
        lines.append("  timings        : " + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items())
                     + f" (total {self.total_seconds:.1f}s)")
        return lines
