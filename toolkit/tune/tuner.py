"""One ``toolkit tune`` run: the spec -> a one-model repository -> Model Analyzer's search -> tune.json.

Everything a user can get wrong (the model, the ranges, a missing Model Analyzer or perf_analyzer) is
refused before anything starts. The repository is gen-repo's own rendering of model.yaml (files are
hard-linked where possible), so ``<model>_config_default`` is exactly what ``toolkit serve`` would run.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from toolkit.errors import SpecError, TuneError
from toolkit.tune.analyzer import Layout, Measurement, analyzer_config, find_model_analyzer, run_profile
from toolkit.tune.apply import apply_changes
from toolkit.tune.results import Outcome, read_outcome
from toolkit.tune.search import SearchSpace, Sweep

MODEL_FILE = "model.yaml"


@dataclass
class TuneRequest:
    model: str
    models_dir: Path  # the folder of model folders (model_repository/)
    out: Path  # build/tune/<model>
    search: SearchSpace = field(default_factory=SearchSpace)
    measurement: Measurement = field(default_factory=Measurement)
    max_p99_ms: float | None = None
    min_gain: float = 5.0  # percent; below it the committed configuration stays
    timeout_s: float = 1800.0
    shapes: dict[str, list[int]] = field(default_factory=dict)  # variable dims of the input data
    default_dim: int = 16
    apply: bool = False
    extra: list[str] = field(default_factory=list)  # model-analyzer profile's own options
    model_analyzer: Path | None = None
    perf_analyzer: Path | None = None


@dataclass
class TuneReport:
    model: str
    sweep: Sweep
    outcome: Outcome
    layout: Layout
    input_notes: list[str]
    applied: dict[str, tuple] = field(default_factory=dict)  # what --apply changed in model.yaml

    @property
    def summary_report(self) -> Path | None:
        """Model Analyzer's own summary (HTML without wkhtmltopdf, PDF with it)."""
        found = sorted((self.layout.out / "reports" / "summaries" / self.model).glob("result_summary.*"))
        return found[0] if found else None


def model_folder(models_dir: Path, model: str) -> Path:
    """The model's source folder; an unknown name is one line listing the models there."""
    folder = Path(models_dir) / model
    if not (folder / MODEL_FILE).is_file():
        known = sorted(d.name for d in Path(models_dir).iterdir() if (d / MODEL_FILE).is_file()) \
            if Path(models_dir).is_dir() else []
        raise TuneError(f"no model {model!r} in {models_dir} (it has {', '.join(known) or 'no model.yaml'}; "
                        "--models chooses another folder)")
    return folder


def tune(request: TuneRequest, on_event: Callable[[str], None] | None = None) -> TuneReport:
    from toolkit.bench.perf_analyzer import find_perf_analyzer
    from toolkit.bench.perf_data import input_data
    from toolkit.repository import Project, generate_repository
    from toolkit.repository.project import load_model
    from toolkit.server.process import bundled_server_dir, free_ports, prepare_backends, stub_environment

    event = on_event or (lambda _: None)
    folder = model_folder(request.models_dir, request.model)
    try:
        source = load_model(folder)
    except SpecError as e:
        raise TuneError(str(e)) from e
    sweep = request.search.resolve(source.spec)
    analyzer = find_model_analyzer(request.model_analyzer)
    perf = find_perf_analyzer(request.perf_analyzer)
    perf.version()
    analyzer.version()

    layout = Layout(request.out.absolute())
    layout.out.mkdir(parents=True, exist_ok=True)
    layout.fresh()
    generate_repository(Project(models={request.model: source}), layout.repository,
                        models_label=Path(request.models_dir).name)
    data = input_data(layout.repository, request.model, request.shapes, request.default_dim)
    data.write(layout.input_data)
    bundle = bundled_server_dir()
    prepare_backends(bundle, layout.backends)
    server_env = stub_environment(perf.env)  # the stub's packages and libpython, perf_analyzer's CUDA runtime
    config = analyzer_config(request.model, layout, tritonserver=bundle / "bin" / "tritonserver",
                             server_env=server_env, ports=tuple(free_ports(3)), perf_analyzer=perf.path,
                             model_config_parameters=sweep.model_config_parameters(),
                             concurrency=sweep.concurrency, measurement=request.measurement,
                             max_p99_ms=request.max_p99_ms, perf_timeout_s=int(min(600, request.timeout_s)))
    layout.config.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    if not sweep.holds_committed:
        event("Note: the ranges do not hold the committed values, so the committed configuration is measured "
              "only once and the run's noise is not shown (add its values to the ranges)")
    event(f"Model Analyzer: {sweep.size} configurations of {request.model} (the committed one first) at "
          f"concurrency {','.join(map(str, sweep.concurrency))}; log: {layout.log}")
    run_profile(analyzer, layout, server_env, request.timeout_s, request.extra, on_line=_progress(event))
    outcome = read_outcome(request.model, layout.out, layout.variants, layout.configs, request.min_gain)
    shutil.rmtree(layout.variants, ignore_errors=True)  # a copy of the model's files; configs/ keeps each config
    report = TuneReport(request.model, sweep, outcome, layout, data.notes)
    if request.apply and outcome.changes:
        apply_changes(folder / MODEL_FILE, {k: new for k, (_, new) in outcome.changes.items()})
        report.applied = outcome.changes
    layout.summary.write_text(json.dumps(_summary(report, request), indent=1), encoding="utf-8")
    return report


def _progress(event: Callable[[str], None]) -> Callable[[str], None]:
    """Model Analyzer's lines worth showing while it runs: which configuration it measures."""
    def line(text: str) -> None:
        text = text.removeprefix("[Model Analyzer] ").strip()
        if text.startswith(("Profiling ", "Creating model config: ")) and "server only" not in text:
            event(f"  {text}")
    return line


def _summary(report: TuneReport, request: TuneRequest) -> dict:
    return {"model": report.model, "models_dir": str(request.models_dir),
            "search": {"instance_count": list(report.sweep.instance_counts),
                       "max_batch_size": list(report.sweep.max_batch_sizes),
                       "max_queue_delay_microseconds": list(report.sweep.queue_delays_us),
                       "concurrency": list(report.sweep.concurrency)},
            "measurement": asdict(request.measurement), "max_p99_ms": request.max_p99_ms,
            "input_data": report.input_notes, **report.outcome.to_dict(),
            "applied": {k: list(v) for k, v in report.applied.items()},
            "model_analyzer_config": str(report.layout.config),
            "summary_report": str(report.summary_report) if report.summary_report else None}
