"""int8 for CPU: dynamic quantization of a BERT export's MatMul weights, gated by accuracy.

    toolkit export bert --quantize int8 [--min-cosine 0.97] [--min-mean-cosine 0.985] [--min-rank 0.98]

What is done (onnxruntime's ``quantize_dynamic``): every MatMul's constant weight becomes int8 with
one scale per output channel; activations are quantized to uint8 at run time, per batch. Nothing
else changes (embeddings, LayerNorm, softmax, GELU stay float32), which is what keeps accuracy:
quantizing every op, or per-tensor weights, loses far more (min cosine 0.93 / 0.96 measured on
MiniLM against 0.985 here).

The gate compares the int8 model with the fp32 export it came from, on ``data/calibration.txt``
(256 real English sentences: 80 from the prose of the licences in Debian's common-licenses, 176
from Python standard library docstrings; none from the benchmark corpus), each embedded as the
attention-masked mean of ``last_hidden_state``, L2-normalised (what the ``embedding`` ensemble
serves):

* min cosine and mean cosine between each sentence's int8 and fp32 embedding;
* rank agreement: Spearman's correlation between the two models' pairwise sentence similarities
  (32,640 pairs) - does int8 still order "which sentences are alike" the same way.

A model that misses any threshold is not written (``QuantizationError``: the numbers are in the
message). The numbers go into ``export.json`` under ``quantization`` and into the CLI summary.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ExportError

CALIBRATION = Path(__file__).parent / "data" / "calibration.txt"
MIN_COSINE, MIN_MEAN_COSINE, MIN_RANK = 0.97, 0.985, 0.98
MAX_SEQ_LENGTH = 256
#: The golden sample of an int8 or fp16 model holds its own outputs, checked this loosely (own_golden).
INT8_GOLDEN_TOLERANCE, INT8_GOLDEN_REL = 0.05, 0.01
SCHEMES = ("int8",)
INT8_METHOD = "onnxruntime quantize_dynamic: MatMul weights int8 per channel, activations uint8 per batch"


class QuantizationError(ExportError):
    """The quantized model missed the accuracy gate (or could not be made)."""


@dataclass(frozen=True)
class Gate:
    min_cosine: float = MIN_COSINE
    min_mean_cosine: float = MIN_MEAN_COSINE
    min_rank: float = MIN_RANK

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not -1.0 <= value <= 1.0:
                raise QuantizationError(f"--{name.replace('_', '-')} must lie in [-1, 1], got {value}")

    def with_overrides(self, min_cosine: float | None, min_mean_cosine: float | None,
                       min_rank: float | None) -> Gate:
        """This gate with the thresholds a user gave (None: keep this gate's)."""
        return Gate(self.min_cosine if min_cosine is None else min_cosine,
                    self.min_mean_cosine if min_mean_cosine is None else min_mean_cosine,
                    self.min_rank if min_rank is None else min_rank)


#: fp16 changes far less than int8 (MiniLM: min cosine 0.99999 on the calibration sentences, see
#: export/README.md); a tighter default catches what goes wrong in float16 (an overflow to infinity).
FP16_GATE = Gate(min_cosine=0.999, min_mean_cosine=0.9995, min_rank=0.999)


@dataclass(frozen=True)
class QuantizationReport:
    scheme: str
    sentences: int
    min_cosine: float
    mean_cosine: float
    rank_agreement: float
    gate: Gate
    fp32_mb: float
    #: The size of the candidate model (int8 or fp16).
    candidate_mb: float
    seconds: float
    method: str = INT8_METHOD
    #: What ``sentences`` counts: calibration sentences (a BERT) or output rows (any model).
    samples: str = "calibration sentences"
    #: More to record in export.json (fp16: the largest activation against float16's range).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        key = "calibration_sentences" if self.samples == "calibration sentences" else "output_rows"
        return {"scheme": self.scheme, "method": self.method, key: self.sentences,
                "min_cosine": self.min_cosine, "mean_cosine": self.mean_cosine,
                "rank_agreement": self.rank_agreement, "gate": asdict(self.gate), "evaluated_with":
                "onnxruntime CPUExecutionProvider", "fp32_mb": self.fp32_mb,
                f"{self.scheme}_mb": self.candidate_mb, "seconds": self.seconds, **self.extra}

    def summary_line(self) -> str:
        g, digits = self.gate, 4 if self.scheme == "int8" else 6  # fp16 differs in the 6th digit
        return (f"  {self.scheme} vs fp32   : over {self.sentences} {self.samples} min cosine "
                f"{self.min_cosine:.{digits}f} (>= {g.min_cosine}), mean {self.mean_cosine:.{digits}f} "
                f"(>= {g.min_mean_cosine}), rank agreement {self.rank_agreement:.{digits}f} (>= {g.min_rank}); "
                f"{self.fp32_mb:.0f} MB -> {self.candidate_mb:.0f} MB")


def judge(report: QuantizationReport, over: str) -> None:
    """Raise ``QuantizationError`` with every missed threshold when ``report`` fails its gate."""
    gate = report.gate
    missed = [f"{what} {value:.5f} < {limit}" for what, value, limit in (
        ("min cosine", report.min_cosine, gate.min_cosine),
        ("mean cosine", report.mean_cosine, gate.min_mean_cosine),
        ("rank agreement", report.rank_agreement, gate.min_rank)) if not value >= limit]  # NaN fails too
    if missed:
        raise QuantizationError(f"the {report.scheme} model missed the accuracy gate over {report.sentences} {over}: "
                                f"{'; '.join(missed)} (min cosine {report.min_cosine:.5f}, mean "
                                f"{report.mean_cosine:.5f}, rank agreement {report.rank_agreement:.5f}); "
                                "nothing was written. Loosen --min-cosine / --min-mean-cosine / --min-rank "
                                "only if that loss is acceptable, or serve fp32.")


def calibration_sentences() -> list[str]:
    return [line for line in CALIBRATION.read_text(encoding="utf-8").splitlines() if line.strip()]


def quantize_bert(fp32_path: Path, int8_path: Path, vocab: Path, *, lower_case: bool = True,
                  gate: Gate = Gate()) -> QuantizationReport:
    """Write ``int8_path`` from ``fp32_path`` if it passes ``gate``; raise ``QuantizationError`` if not."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic suggests shape-inference pre-processing on every call; for MatMul-only
    # dynamic quantization it changes nothing, so its one-line advice is dropped.
    logging.getLogger().addFilter(_drop_preprocess_advice)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toolkit-int8-") as tmp:
        candidate = Path(tmp) / "model.onnx"
        try:
            quantize_dynamic(str(fp32_path), str(candidate), per_channel=True, weight_type=QuantType.QInt8,
                             op_types_to_quantize=["MatMul"])
        except Exception as e:  # onnxruntime raises bare Exceptions for graphs it cannot quantize
            raise QuantizationError(f"onnxruntime could not quantize {fp32_path}: {e}") from e
        report = gated_report("int8", fp32_path, candidate, vocab, lower_case, calibration_sentences(), gate, start)
        candidate.replace(int8_path)
    return report


def gated_report(scheme: str, fp32_path: Path, candidate: Path, vocab: Path, lower_case: bool,
                 sentences: list[str], gate: Gate, start: float, **fields: Any) -> QuantizationReport:
    """The candidate's embeddings of ``sentences`` against fp32's, judged by ``gate`` (raises
    ``QuantizationError`` below it); ``fields`` are the report's other fields (method, extra)."""
    reference = _embed(fp32_path, vocab, lower_case, sentences)
    lowered = _embed(candidate, vocab, lower_case, sentences)
    cosine = np.sum(reference * lowered, axis=1)
    upper = np.triu_indices(len(sentences), 1)
    rank = _spearman((reference @ reference.T)[upper], (lowered @ lowered.T)[upper])
    report = QuantizationReport(scheme, len(sentences), float(cosine.min()), float(cosine.mean()), rank, gate,
                                fp32_path.stat().st_size / 1e6, candidate.stat().st_size / 1e6,
                                round(time.perf_counter() - start, 2), **fields)
    judge(report, "calibration sentences")
    return report


def _embed(model: Path, vocab: Path, lower_case: bool, sentences: list[str], batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    from toolkit.builtins.text import masked_mean

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    rows = []
    for feeds in calibration_feeds(vocab, lower_case, sentences, batch):
        hidden = session.run(["last_hidden_state"], {k: v for k, v in feeds.items() if k in wanted})[0]
        mean = masked_mean(hidden, feeds["attention_mask"])
        rows.append(mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12))
    return np.concatenate(rows)


def calibration_feeds(vocab: Path, lower_case: bool, sentences: list[str], batch: int = 16):
    """The sentences as BERT input batches, tokenized as the served tokenizer does."""
    from toolkit.builtins.text import build_wordpiece_tokenizer

    tokenizer = build_wordpiece_tokenizer(vocab, lower_case, MAX_SEQ_LENGTH)  # as the served tokenizer
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"))
    for i in range(0, len(sentences), batch):
        encoded = tokenizer.encode_batch(sentences[i:i + batch])
        yield {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
               "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
               "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64)}


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties are vanishingly rare in float similarities)."""
    return float(np.corrcoef(a.argsort().argsort(), b.argsort().argsort())[0, 1])


def _drop_preprocess_advice(record: logging.LogRecord) -> bool:
    return "pre-processing before quantization" not in record.getMessage()


def own_golden(model: Path, inputs: dict[str, Any]) -> tuple[dict[str, np.ndarray], float, float]:
    """An int8 or fp16 model's own outputs as its golden sample. Its tolerance is looser than fp32's:
    int8 kernels differ between CPUs (with and without VNNI) by ~1e-2 in hidden states, fp16 ones
    between the CPU and a GPU, while a wrong model differs by ~1."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True)), INT8_GOLDEN_TOLERANCE, INT8_GOLDEN_REL
