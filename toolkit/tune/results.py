"""Model Analyzer's results, read back: one row per configuration and concurrency, the winner, the committed one.

Model Analyzer writes ``results/metrics-model-inference.csv`` (the ``inference_output_fields`` asked for)
and keeps each configuration it tried as ``output_model_repository/<variant>/config.pbtxt``. The CSV names
a variant and its instance group and max batch size, not its queue delay, so each variant's values are read
from its config, parsed by Triton's own ModelConfig protobuf.

The winner is the row with the highest throughput among those within the constraints (``--max-p99-ms``);
the committed configuration (``<model>_config_default``: the config gen-repo renders from model.yaml) is
compared at the winner's concurrency. When the sweep holds the committed values too (a "twin": the same
configuration measured again) the better of the two is the baseline, and their spread shows the noise.
A winner that is not ``min_gain`` percent faster than the baseline is reported, but not worth writing
back: that is within a shared machine's run-to-run noise.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.errors import TuneError

CSV_NAME = "metrics-model-inference.csv"
#: Model Analyzer's column headers -> our fields (its record types' ``header()``).
COLUMNS = {"Model Config Path": "variant", "Concurrency": "concurrency", "Throughput (infer/sec)": "throughput",
           "p99 Latency (ms)": "p99_ms", "Avg Latency (ms)": "avg_ms", "Server Queue time (ms)": "server_queue_ms",
           "Server Compute Infer time (ms)": "compute_infer_ms", "Satisfies Constraints": "satisfies"}
REQUIRED = ("variant", "concurrency", "throughput", "p99_ms")


@dataclass(frozen=True)
class Values:
    """The three model.yaml fields the search varies, as one configuration has them."""

    instance_count: int
    max_batch_size: int
    max_queue_delay_microseconds: int | None  # None: no dynamic batching

    def differences(self, other: Values) -> dict[str, tuple]:
        """``{field: (other's, ours)}`` where they differ."""
        return {k: (v, getattr(self, k)) for k, v in asdict(other).items() if v != getattr(self, k)}


@dataclass(frozen=True)
class Trial:
    variant: str
    committed: bool
    values: Values
    concurrency: int
    throughput: float  # inferences/s
    p99_ms: float
    avg_ms: float | None
    server_queue_ms: float | None
    compute_infer_ms: float | None
    satisfies: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Outcome:
    trials: list[Trial]
    winner: Trial | None
    committed: Trial | None  # the committed configuration at the winner's concurrency
    min_gain: float
    #: Configurations Model Analyzer loaded but could not measure (perf_analyzer found no stable window, or
    #: the model failed): Model Analyzer leaves them out of its CSV.
    unmeasured: dict[str, Values] = field(default_factory=dict)

    @property
    def twins(self) -> list[Trial]:
        """Other configurations with the committed values, at the winner's concurrency: the same configuration
        measured again (Model Analyzer changes nothing else), so their spread is this run's noise."""
        if self.committed is None:
            return []
        return [t for t in self.trials if not t.committed and t.values == self.committed.values
                and t.concurrency == self.committed.concurrency]

    @property
    def baseline(self) -> float | None:
        """The committed values' best throughput: the committed configuration's or a twin's."""
        if self.committed is None:
            return None
        return max(t.throughput for t in [self.committed, *self.twins])

    @property
    def gain(self) -> float | None:
        """The winner's throughput over the baseline's, in percent."""
        if self.winner is None or not self.baseline:
            return None
        return 100.0 * (self.winner.throughput / self.baseline - 1.0)

    @property
    def changes(self) -> dict[str, tuple]:
        """What writing the winner back would change in model.yaml: nothing unless it beats the committed
        configuration by more than ``min_gain`` percent."""
        if self.winner is None or self.committed is None or self.winner.values == self.committed.values:
            return {}
        if self.gain is None or self.gain <= self.min_gain:
            return {}
        return self.winner.values.differences(self.committed.values)

    def to_dict(self) -> dict:
        return {"trials": [t.to_dict() for t in self.trials], "winner": self.winner and self.winner.variant,
                "committed": self.committed and self.committed.variant, "twins": [t.variant for t in self.twins],
                "baseline_throughput": self.baseline, "gain_percent": self.gain,
                "min_gain_percent": self.min_gain, "changes": {k: list(v) for k, v in self.changes.items()},
                "unmeasured": {name: asdict(v) for name, v in self.unmeasured.items()}}


def config_values(path: Path) -> Values:
    """A config.pbtxt's instance count, max batch size and queue delay (Triton's ModelConfig parses it)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        config = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise TuneError(f"{path}: cannot read the configuration Model Analyzer tried ({e})") from e
    count = sum(group.count or 1 for group in config.instance_group) or 1
    delay = config.dynamic_batching.max_queue_delay_microseconds if config.HasField("dynamic_batching") else None
    return Values(count, config.max_batch_size, delay)


def read_outcome(model: str, export_dir: Path, variants_dir: Path, configs_dir: Path, min_gain: float = 5.0) -> Outcome:
    """The trials of a finished run; each variant's config is kept in ``configs_dir`` (the variants'
    folder holds a copy of the model's files, which the caller may remove)."""
    path = export_dir / "results" / CSV_NAME
    if not path.is_file():
        raise TuneError(f"Model Analyzer wrote no {path}: no configuration was measured")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    configs_dir.mkdir(parents=True, exist_ok=True)
    values: dict[str, Values] = {}
    trials = []
    for row in rows:
        fields = {COLUMNS[k]: v for k, v in row.items() if k in COLUMNS}
        missing = [name for name in REQUIRED if not fields.get(name)]
        if missing:
            raise TuneError(f"{path}: unexpected Model Analyzer CSV (no {', '.join(missing)}); columns: {sorted(row)}")
        variant = fields["variant"]
        if variant not in values:
            source = variants_dir / variant / "config.pbtxt"
            values[variant] = config_values(source)
            shutil.copyfile(source, configs_dir / f"{variant}.pbtxt")
        try:
            trials.append(Trial(variant, variant == f"{model}_config_default", values[variant],
                                int(float(fields["concurrency"])), float(fields["throughput"]),
                                float(fields["p99_ms"]), _number(fields.get("avg_ms")),
                                _number(fields.get("server_queue_ms")), _number(fields.get("compute_infer_ms")),
                                fields.get("satisfies", "Yes").strip().lower() != "no"))
        except ValueError as e:
            raise TuneError(f"{path}: unexpected value in Model Analyzer's CSV ({e})") from e
    unmeasured = {}
    for folder in sorted(variants_dir.iterdir()) if variants_dir.is_dir() else []:
        if folder.name not in values and (folder / "config.pbtxt").is_file():
            unmeasured[folder.name] = config_values(folder / "config.pbtxt")
            shutil.copyfile(folder / "config.pbtxt", configs_dir / f"{folder.name}.pbtxt")
    return pick(trials, min_gain, unmeasured)


def pick(trials: list[Trial], min_gain: float = 5.0, unmeasured: dict[str, Values] | None = None) -> Outcome:
    trials = sorted(trials, key=lambda t: (t.concurrency, not t.committed, -t.throughput))
    eligible = [t for t in trials if t.satisfies]
    winner = max(eligible, key=lambda t: t.throughput, default=None)
    committed = None
    if winner is not None:
        committed = next((t for t in trials if t.committed and t.concurrency == winner.concurrency), None)
    return Outcome(trials, winner, committed, min_gain, dict(unmeasured or {}))


def _number(text: str | None) -> float | None:
    return float(text) if text not in (None, "") else None
