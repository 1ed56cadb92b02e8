"""The export check: does the ONNX file, *as Triton will serve it*, compute what the source computes?

Three questions, each answered by running onnxruntime on the check cases:

1. **The file.** With graph optimizations off (``ORT_DISABLE_ALL``) every output must match the
   source: otherwise the conversion is wrong and the export fails, naming every disagreement.
2. **The served path.** The same cases through ``toolkit.runtime.onnx_hook.session``, the very
   function the ONNX hook serves with (``ORT_ENABLE_ALL``). If only this disagrees, onnxruntime's
   graph optimizer changes the model (onnxruntime 1.31.1 folds the zero ``Pad`` before a ResNetV2
   stem's ``MaxPool`` into the pool, ``Pad_Fusion``). The check then finds the rewrites to skip
   (``disabled_optimizers``), and the highest graph level the container's onnxruntime backend may
   use (it has no per-rewrite switch), and records both in ``export.json`` under ``onnxruntime``:
   the hook and the container config honour them.
3. **Can the check tell?** An output that hardly changes across the check inputs (an untrained
   head answers 1/1000 for every class and every image) cannot tell a right model from a wrong
   one. Such outputs are reported as *not discriminating*; the exporter then also checks probe
   tensors (a layer before the head), and writes no ``golden.npz`` that could not tell two models apart.

Tolerance: by default relative, ``|onnx - source| <= rel_tolerance x peak |source|`` per output and
case; an absolute ``tolerance`` may be added.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from toolkit.errors import ExportError, first_line
from toolkit.export import memory
from toolkit.export.report import CheckResult
from toolkit.runtime.onnx_hook import SERVED_LEVEL, session

Arrays = dict[str, np.ndarray]
#: How many times the allowed difference an output must vary across the check inputs to count as
#: discriminating: a model that ignored its input would then fail the check by that margin.
DISCRIMINATION_MARGIN = 10.0
#: onnxruntime 1.31's graph rewrites by the names ``disabled_optimizers`` takes (unknown names are
#: ignored, so the list may be generous). Searched when the optimizer changes a model's outputs.
REWRITES = (
    "Pad_Fusion", "ConvAddFusion", "ConvMulFusion", "ConvBNFusion", "ConvActivationFusion",
    "ConvAddActivationFusion", "FuseReluClip", "DivMulFusion", "NotWhereFusion", "GemmSumFusion",
    "GemmTransposeFusion", "GemmActivationFusion", "MatMulAddFusion", "MatMulScaleFusion",
    "MatmulTransposeFusion", "MatMulActivationFusion", "ReshapeFusion", "GatherToSliceFusion",
    "ExpandElimination", "CastElimination", "CastChainElimination", "EliminateIdentity", "EliminateSlice",
    "EliminateDropout", "UnsqueezeElimination", "NoopElimination", "PreShapeNodeElimination",
    "CommonSubexpressionElimination", "ConstantFolding", "ConstantSharing", "LayerNormFusion",
    "SimplifiedLayerNormFusion", "SkipLayerNormFusion", "BiasSkipLayerNormFusion", "EmbedLayerNormFusion",
    "AttentionFusion", "GeluFusion", "BiasGeluFusion", "FastGeluFusion", "QuickGeluFusion",
    "BiasSoftmaxFusion", "BiasDropoutFusion", "SliceConcatToSpaceToDepthFusion", "LabelEncoderFusion",
    "NchwcTransformer", "NhwcTransformer", "TransposeOptimizer", "RemoveDuplicateCastTransformer",
)
#: How far (relative) the inputs are nudged to see whether the source itself is stable.
NUDGE = 1e-6
#: Triton's onnxruntime backend: ``optimization { graph { level: N } }`` (-1 basic, 1 extended,
#: 2 none; no section: all).
TRITON_GRAPH_LEVEL = {"ORT_ENABLE_EXTENDED": 1, "ORT_ENABLE_BASIC": -1, "ORT_DISABLE_ALL": 2}


@dataclass(frozen=True)
class CheckCase:
    """One set of generated inputs, with a label that says what it exercises ("batch=3 seq=17")."""

    label: str
    inputs: Arrays


class _Runner:
    """Runs every case through one onnxruntime configuration; one session alive at a time."""

    def __init__(self, model: onnx.ModelProto | Path, cases: Sequence[CheckCase], names: Sequence[str]):
        self.source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        self.cases, self.names = cases, list(names)

    def run(self, serving: Mapping[str, object]) -> list[Arrays]:
        memory.release()  # the last session's weights, before this one copies them again
        try:
            sess = session(ort, self.source, 0, "false", dict(serving))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ExportError(f"onnxruntime cannot load the exported model: {first_line(e)}") from e
        results = []
        for case in self.cases:
            try:
                results.append(dict(zip(self.names, sess.run(self.names, case.inputs), strict=True)))
            except Exception as e:
                raise ExportError(f"onnxruntime failed on {case.label}: {first_line(e)}") from e
        return results


#: Files this large are checked from a copy with their weights in a ``.data`` file beside it, which
#: onnxruntime maps instead of copying: EfficientNetB7's (247 MB) served-level session took 0.55 GB
#: from a single file and 0.35 GB mapped.
MAP_BYTES = 64 * 2**20


def _maps_better(path: Path) -> bool:
    return path.stat().st_size >= MAP_BYTES and not path.with_name(f"{path.name}.data").exists()


@contextlib.contextmanager
def _weights_outside(path: Path) -> Iterator[Path]:
    """A copy of the ONNX file at ``path`` with its weights as external data (same bytes, same graph),
    removed afterwards."""
    scratch = path.parent / f".{path.stem}.mapped"
    scratch.mkdir(exist_ok=True)
    try:
        model = onnx.load(str(path))
        onnx.save_model(model, str(scratch / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        del model
        memory.release()
        yield scratch / path.name
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def reference_outputs(reference: Callable[[Arrays], Arrays], cases: Sequence[CheckCase]) -> list[Arrays]:
    return [{k: np.asarray(v) for k, v in reference(case.inputs).items()} for case in cases]


def check_onnx(model: onnx.ModelProto | Path, cases: Sequence[CheckCase], expected: Sequence[Arrays],
               tolerance: float | None, rel_tolerance: float, *, probes: Mapping[str, str] | None = None,
               nudged: Sequence[Arrays] | Callable[[], Sequence[Arrays]] | None = None) -> CheckResult:
    """Check ``model`` (a proto, or a file path for models too big to hold twice) against ``expected``.

    ``probes`` maps extra graph outputs (checked like outputs, then stripped by the exporter) to what
    they are, e.g. ``{"probe.avg_pool": "layer 'avg_pool' (GlobalAveragePooling2D)"}``. ``nudged``
    (``nudged_outputs``: the source on inputs moved by ``NUDGE``) lets a failure tell a wrong
    conversion from a source so unstable that float32 rounding alone changes its outputs; a callable
    is called only then.
    """
    if isinstance(model, Path) and _maps_better(model):
        with _weights_outside(model) as mapped:
            return check_onnx(mapped, cases, expected, tolerance, rel_tolerance, probes=probes, nudged=nudged)
    names = sorted(expected[0]) if expected else []
    runner = _Runner(model, cases, names)
    raw = runner.run({"graph_optimization_level": "ORT_DISABLE_ALL"})
    problems = _problems(cases, expected, raw, tolerance, rel_tolerance)
    if problems:
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        unstable = []
        nudged = nudged() if callable(nudged) else nudged
        if nudged:
            common = [sorted(set(e) & set(n)) for e, n in zip(expected, nudged, strict=True)]
            unstable = _problems(cases, [{k: e[k] for k in c} for e, c in zip(expected, common, strict=True)],
                                 [{k: n[k] for k in c} for n, c in zip(nudged, common, strict=True)],
                                 tolerance, rel_tolerance)
        why = (f". The source itself is that unstable: nudging its inputs by {NUDGE:g} (relative) moves "
               f"{'; '.join(unstable[:2])}. Its activations explode (random weights?): no float32 runtime can "
               "match it; export it with trained weights (--weights)" if unstable else
               ". The conversion is wrong: please report it with the model; --rel-tolerance loosens the check "
               "if the difference is only rounding")
        raise ExportError(f"the ONNX model disagrees with the source in {len(problems)} place(s) (onnxruntime "
                          f"with graph optimizations off): {'; '.join(problems[:3])}{more}{why}")
    served = runner.run({})
    serving: dict[str, object] = {}
    bug = _problems(cases, expected, served, tolerance, rel_tolerance)
    if bug:
        serving = _work_around(runner, cases, expected, tolerance, rel_tolerance, bug)
        served = runner.run(serving)
    stats = _stats(expected, [raw, served], tolerance, rel_tolerance)
    probes = dict(probes or {})
    largest = max(range(len(cases)), key=lambda i: sum(np.asarray(v).size for v in cases[i].inputs.values()))
    outputs_only = {k: v for k, v in expected[largest].items() if k not in probes}
    return CheckResult(
        max_abs_diff=max((s["abs"] for n, s in stats.items() if n not in probes), default=0.0),
        per_output={n: s["abs"] for n, s in stats.items()}, peak_abs={n: s["peak"] for n, s in stats.items()},
        rel_per_output={n: s["rel"] for n, s in stats.items()},
        spread={n: s["spread"] for n, s in stats.items()},
        discriminating={n: s["discriminating"] for n, s in stats.items()},
        cases=[c.label for c in cases], tolerance=tolerance, rel_tolerance=rel_tolerance, serving=serving,
        probes=probes, golden_inputs=dict(cases[largest].inputs) if cases else {}, golden_outputs=outputs_only)


def nudged_outputs(reference: Callable[[Arrays], Arrays], cases: Sequence[CheckCase]) -> list[Arrays]:
    """The source's outputs when its float inputs move by ``NUDGE`` (relative, random)."""
    rng = np.random.default_rng(0)
    nudged = []
    for case in cases:
        inputs = {k: (v * (1 + NUDGE * rng.standard_normal(v.shape))).astype(v.dtype) if v.dtype.kind == "f" else v
                  for k, v in case.inputs.items()}
        nudged.append({k: np.asarray(v) for k, v in reference(inputs).items()})
    return nudged


def _work_around(runner: _Runner, cases, expected, tolerance, rel_tolerance, bug: list[str]) -> dict[str, object]:
    """What makes the served path agree with the source, and what the container may use."""

    def agrees(serving: Mapping[str, object]) -> bool:
        return not _problems(cases, expected, runner.run(serving), tolerance, rel_tolerance)

    serving: dict[str, object] = {"optimizer_bug": f"onnxruntime {ort.__version__} at {SERVED_LEVEL} "
                                                   f"changes the outputs: {bug[0]}"}
    # the highest level that agrees: the container's (it has no per-rewrite switch), and the hook's
    # when no set of rewrites to skip is enough
    level = next((lv for lv in ("ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC")
                  if agrees({"graph_optimization_level": lv})), "ORT_DISABLE_ALL")
    if agrees({"disabled_optimizers": list(REWRITES)}):
        serving["disabled_optimizers"] = _minimal(list(REWRITES), [], lambda names: agrees(
            {"disabled_optimizers": names}))
    else:
        serving["graph_optimization_level"] = level
    serving["triton_graph_level"] = TRITON_GRAPH_LEVEL[level]
    return serving


def _minimal(names: list[str], base: list[str], fixes: Callable[[list[str]], bool]) -> list[str]:
    """A small subset S of ``names`` with ``fixes(base + S)``, given ``fixes(base + names)``."""
    if len(names) <= 1:
        return names
    half = len(names) // 2
    left, right = names[:half], names[half:]
    if fixes(base + left):
        return _minimal(left, base, fixes)
    if fixes(base + right):
        return _minimal(right, base, fixes)
    need_left = _minimal(left, base + right, fixes)
    return need_left + _minimal(right, base + need_left, fixes)


def _problems(cases, expected, actual, tolerance, rel_tolerance) -> list[str]:
    problems = []
    for case, want, got in zip(cases, expected, actual, strict=True):
        if set(want) != set(got):
            raise ExportError(f"output names differ: source {sorted(want)}, ONNX {sorted(got)}")
        for name in sorted(want):
            problem = _compare_one(name, case.label, want[name], got[name], tolerance, rel_tolerance)
            if problem:
                problems.append(problem)
    return problems


def _compare_one(name: str, label: str, expected: np.ndarray, actual: np.ndarray, tolerance: float | None,
                 rel_tolerance: float) -> str | None:
    if expected.shape != actual.shape:
        return f"{name} ({label}): shape {actual.shape} from ONNX, {expected.shape} from the source"
    if expected.dtype != actual.dtype:
        return f"{name} ({label}): dtype {actual.dtype} from ONNX, {expected.dtype} from the source"
    if expected.size == 0:
        return None
    exp64, act64 = expected.astype(np.float64), actual.astype(np.float64)
    if not np.array_equal(np.isnan(exp64), np.isnan(act64)):
        return f"{name} ({label}): NaN in different places"
    diff, peak = _diff(exp64, act64), float(np.nanmax(np.abs(exp64), initial=0.0))
    if tolerance is not None and diff > tolerance:
        return f"{name} ({label}): max abs diff {diff:.3g} > tolerance {tolerance:g}"
    if diff > rel_tolerance * peak:
        return (f"{name} ({label}): max abs diff {diff:.3g} = {diff / peak if peak else float('inf'):.3g} "
                f"of its peak |value| {peak:.3g} > rel_tolerance {rel_tolerance:g}")
    return None


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    return float(np.nanmax(d, initial=0.0))


def _stats(expected: Sequence[Arrays], runs: Sequence[Sequence[Arrays]], tolerance, rel_tolerance) -> dict:
    """Per output: the largest abs and relative difference over every run and case, the peak, and
    how much the output varies across the check inputs (``spread``, relative to the peak)."""
    stats = {}
    for name in sorted(expected[0]) if expected else []:
        peak = max(float(np.nanmax(np.abs(e[name].astype(np.float64)), initial=0.0)) for e in expected)
        diffs = [_diff(e[name].astype(np.float64), r[name].astype(np.float64))
                 for run in runs for e, r in zip(expected, run, strict=True) if e[name].shape == r[name].shape]
        spread = _spread([e[name] for e in expected])
        stats[name] = {"abs": max(diffs, default=0.0), "peak": peak,
                       "rel": max(diffs, default=0.0) / peak if peak else 0.0,
                       "spread": spread / peak if peak else 0.0,
                       "discriminating": expected[0][name].dtype.kind not in "fc"
                       or _discriminating(spread, peak, tolerance, rel_tolerance)}
    return stats


def discriminates(arrays: Sequence[np.ndarray], tolerance: float | None, rel_tolerance: float) -> bool:
    """Whether one output's values over the check cases (first axis: examples) vary across examples
    by ``DISCRIMINATION_MARGIN`` times what the check allows: then a model that ignored its input,
    or computed something else, would fail the check."""
    if not arrays or np.asarray(arrays[0]).dtype.kind not in "fc":
        return True  # integers and booleans are compared exactly
    peak = max(float(np.nanmax(np.abs(np.asarray(a, dtype=np.float64)), initial=0.0)) for a in arrays)
    return _discriminating(_spread(arrays), peak, tolerance, rel_tolerance)


def _discriminating(spread: float, peak: float, tolerance: float | None, rel_tolerance: float) -> bool:
    allowed = rel_tolerance * peak if tolerance is None else min(tolerance, rel_tolerance * peak)
    return spread > DISCRIMINATION_MARGIN * allowed


def _spread(arrays: Sequence[np.ndarray]) -> float:
    """The largest difference between two examples' outputs (first axis = examples), among examples
    whose outputs have the same shape."""
    groups: dict[tuple[int, ...], list[np.ndarray]] = {}
    for array in arrays:
        a = np.asarray(array, dtype=np.float64)
        if a.ndim == 0:
            continue
        for example in a:
            groups.setdefault(example.shape, []).append(example)
    spread = 0.0
    for examples in groups.values():
        stacked = np.stack(examples)
        with np.errstate(invalid="ignore"):
            spread = max(spread, float(np.nanmax(np.nanmax(stacked, axis=0) - np.nanmin(stacked, axis=0),
                                                 initial=0.0)))
    return spread


def compare_with_onnxruntime(model: onnx.ModelProto | Path, reference: Callable[[Arrays], Arrays],
                             cases: Sequence[CheckCase], tolerance: float | None,
                             rel_tolerance: float) -> CheckResult:
    """``check_onnx`` with the expected outputs computed by ``reference`` (the source model)."""
    return check_onnx(model, cases, reference_outputs(reference, cases), tolerance, rel_tolerance,
                      nudged=lambda: nudged_outputs(reference, cases))
