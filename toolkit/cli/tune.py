"""``toolkit tune MODEL``: Model Analyzer's search over one model's serving settings (``toolkit.tune``)."""

from __future__ import annotations

from pathlib import Path

import click


def _numbers(ctx, param, value):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError as e:
        raise click.BadParameter(f"expected comma-separated whole numbers, got {value!r}") from e


def _shapes(ctx, param, values):
    from toolkit.bench.perf_analyzer import parse_shape

    shapes = {}
    for value in values:
        try:
            name, dims = parse_shape(value)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected NAME:d1,d2,... (no batch dim)") from None
        shapes[name] = dims
    return shapes


@click.command("tune", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model")
@click.option("--models", "models_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("model_repository"), show_default=True,
              help="Folder of model folders, each with a model.yaml.")
@click.option("--instances", callback=_numbers, default=None, help="Instance counts to try [default: 1,2].")
@click.option("--max-batch-sizes", callback=_numbers, default=None,
              help="Max batch sizes to try [default: the committed one and a quarter of it, not below the "
                   "largest preferred batch size].")
@click.option("--queue-delays", callback=_numbers, default=None,
              help="Dynamic batching max_queue_delay_microseconds to try [default: 0,2000].")
@click.option("--concurrency", callback=_numbers, default="8", show_default=True,
              help="perf_analyzer's concurrency (several: each configuration at each).")
@click.option("--window-ms", type=click.IntRange(100), default=2000, show_default=True,
              help="perf_analyzer's measurement window per trial.")
@click.option("--stability", type=click.IntRange(1), default=25, show_default=True,
              help="Percent within which three windows in a row must agree.")
@click.option("--max-p99-ms", type=click.FloatRange(0, min_open=True), default=None,
              help="Only configurations with a p99 latency below this can win (Model Analyzer's constraint).")
@click.option("--min-gain", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Percent of throughput the winner must gain over the committed configuration to be applied.")
@click.option("--shape", "shapes", multiple=True, callback=_shapes, metavar="NAME:d1,d2",
              help="Variable dims of an input in the requests sent (repeatable), e.g. input_ids:64.")
@click.option("--timeout", type=click.FloatRange(1), default=1800.0, show_default=True,
              help="Seconds the whole search may take; it is stopped after.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where Model Analyzer's reports, the configurations tried and tune.json go. "
                   "[default: build/tune/MODEL]")
@click.option("--apply", is_flag=True,
              help="Write the winner's instance_count, max_batch_size and queue delay into MODEL's model.yaml.")
@click.option("--model-analyzer", "analyzer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The model-analyzer command. Default: $TOOLKIT_MODEL_ANALYZER, .venv-tune/bin/model-analyzer, PATH.")
@click.option("--perf-analyzer", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The perf_analyzer binary. Default: $TOOLKIT_PERF_ANALYZER, .venv-perf/bin/perf_analyzer, PATH.")
@click.argument("analyzer_args", nargs=-1, type=click.UNPROCESSED)
def tune(model: str, models_dir: Path, instances, max_batch_sizes, queue_delays, concurrency, window_ms: int,
         stability: int, max_p99_ms: float | None, min_gain: float, shapes: dict, timeout: float, out: Path | None,
         apply: bool, analyzer: Path | None, perf_analyzer: Path | None, analyzer_args: tuple[str, ...]) -> None:
    """Search MODEL's instance count, max batch size and queue delay with Triton's Model Analyzer.

    It runs the bundled tritonserver on this machine once per configuration, the committed one included,
    and prints each with its throughput and p99 latency. Options after -- go to `model-analyzer profile`.
    """
    from toolkit.tune import Measurement, SearchSpace, TuneRequest
    from toolkit.tune import tune as run

    request = TuneRequest(model, models_dir, out or Path("build/tune") / model,
                          SearchSpace(instances, max_batch_sizes, queue_delays, concurrency),
                          Measurement(window_ms=window_ms, stability=stability), max_p99_ms, min_gain, timeout,
                          shapes, apply=apply, extra=list(analyzer_args), model_analyzer=analyzer,
                          perf_analyzer=perf_analyzer)
    report = run(request, on_event=click.echo)
    outcome = report.outcome
    click.echo(f"{'configuration':<28} {'inst':>4} {'mbs':>4} {'delay us':>8} {'conc':>4} {'infer/s':>8} "
               f"{'p99 ms':>8}")
    for t in outcome.trials:
        mark = " <- winner" if t is outcome.winner else ""
        mark += " (committed)" if t.committed else ""
        mark += "" if t.satisfies else " (over --max-p99-ms)"
        delay = "-" if t.values.max_queue_delay_microseconds is None else t.values.max_queue_delay_microseconds
        click.echo(f"{t.variant:<28} {t.values.instance_count:>4} {t.values.max_batch_size:>4} {delay:>8} "
                   f"{t.concurrency:>4} {t.throughput:>8.1f} {t.p99_ms:>8.1f}{mark}")
    for name, v in outcome.unmeasured.items():
        delay = "-" if v.max_queue_delay_microseconds is None else v.max_queue_delay_microseconds
        click.echo(f"{name:<28} {v.instance_count:>4} {v.max_batch_size:>4} {delay:>8}    -        -        - "
                   "not measured (no stable window, or it failed: see perf_analyzer_error.log)")
    for twin in outcome.twins:
        spread = 100.0 * abs(twin.throughput / outcome.committed.throughput - 1.0)
        click.echo(f"Noise: {twin.variant} has the committed values and measured {spread:.0f}% apart from it "
                   "(the better of the two is the baseline).")
    click.echo(_verdict(report, models_dir / model / "model.yaml"))
    if report.summary_report:
        click.echo(f"Model Analyzer's summary: {report.summary_report}")
    click.echo(f"Results: {report.layout.summary}")


def _verdict(report, model_yaml: Path) -> str:
    """One line: what won, and whether model.yaml changed."""
    outcome = report.outcome
    winner, gain = outcome.winner, outcome.gain
    if winner is None:
        return "No configuration met --max-p99-ms: model.yaml unchanged."
    if winner.committed or (outcome.committed and winner.values == outcome.committed.values):
        return "The committed configuration won: nothing to apply."
    if outcome.committed is None:
        return "The committed configuration was not measured at the winner's concurrency: nothing to apply."
    if not outcome.changes:
        if gain is not None and gain <= outcome.min_gain:
            return (f"{winner.variant} gains {gain:.1f}%, not more than --min-gain {outcome.min_gain:g}%: "
                    "the committed configuration stays.")
        return "Nothing to apply."
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in outcome.changes.items())
    if report.applied:
        return f"Applied to {model_yaml}: {what} (+{gain:.0f}% throughput); check the comments beside them."
    return (f"Winner: {what} (+{gain:.0f}% throughput at concurrency {winner.concurrency}); --apply writes it "
            "into model.yaml.")
