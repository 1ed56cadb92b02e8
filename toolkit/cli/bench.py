"""``toolkit bench``: load a running server, or compare the toolkit against the baselines in one run."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _numbers(kind):
    def parse(ctx, param, value):
        if not value:
            return ()
        try:
            return tuple(kind(v) for v in value.split(","))
        except ValueError as e:
            raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from e

    return parse


DEFAULT_CONTENDERS = ("inprocess", "naive", "pytriton", "toolkit", "toolkit-fused", "toolkit-int8", "mosec",
                      "infinity", "ray")


@click.group()
def bench() -> None:
    """Measure throughput and latency (closed and open loop) with Triton's queue/compute split."""


@bench.command("load")
@click.option("--url", required=True, help="host:port of the server (gRPC port for triton-grpc).")
@click.option("--model", default=None, help="Model (or route, for json-http). Default: the --workload's name.")
@click.option("--kind", type=click.Choice(["triton-grpc", "triton-http", "json-http"]), default="triton-grpc",
              show_default=True)
@click.option("--workload", type=click.Choice(["embedding", "short", "mobile"]), default="embedding",
              show_default=True, help="Which payloads to send: the sentence corpus, its 8-16 word sentences, or "
                                      "224x224 JPEG images.")
@click.option("--concurrency", callback=_numbers(int), default="1,4,16", show_default=True)
@click.option("--rate", callback=_numbers(float), default="", help="Open-loop Poisson rates (req/s), e.g. 20,50.")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Measurement window per point.")
@click.option("--warmup", type=float, default=2.0, show_default=True)
def load(url: str, model: str | None, kind: str, workload: str, concurrency: tuple[int, ...], rate: tuple[float, ...],
         seconds: float, warmup: float) -> None:
    """Drive a running server and print one line per load point."""
    from toolkit.bench.loadgen import PointSpec, TargetSpec, run_point
    from toolkit.bench.workloads import workload as make_workload
    from toolkit.client import normalize_url
    from toolkit.errors import BenchError

    work = make_workload(workload, Path("."))
    url, model = normalize_url(url), model or work.model
    _check_reachable(kind, url, model)  # fail in a second, not after a window of failed requests
    target = TargetSpec(kind, url, model, work.input_name, json_field=work.json_field)
    payloads = work.payloads()
    failed = 0
    for key, values in (("concurrency", concurrency), ("rate", rate)):
        for value in values:
            r = run_point(PointSpec(target, payloads, warmup_s=warmup, measure_s=seconds, **{key: value}))
            failed += r.errors
            click.echo(f"{key}={value}: {r.throughput:.1f} req/s  p50 {r.p50_ms:.1f} ms  p95 {r.p95_ms:.1f} ms  "
                       f"p99 {r.p99_ms:.1f} ms  errors {r.errors}  cv {r.variation:.2f}")
            for sample in r.error_samples[:2]:
                click.echo(f"    e.g. {sample}")
    if failed:
        raise BenchError(f"{failed} requests failed")


def _check_reachable(kind: str, url: str, model: str) -> None:
    from toolkit.errors import BenchError

    if kind == "json-http":
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"http://{url}/", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # it answers: the route itself is checked by the first requests
        except (OSError, ValueError) as e:
            raise BenchError(f"cannot reach http://{url}/ ({getattr(e, 'reason', None) or e})") from e
        return
    from toolkit.client import TritonClient

    protocol = "grpc" if kind == "triton-grpc" else "http"
    with TritonClient(url, protocol=protocol, timeout=5) as client:  # type: ignore[arg-type]
        client.metadata(model)  # raises InferenceError naming the URL, or the unknown model


@bench.command("perf", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("model")
@click.option("--url", default=None, help="host:port of the running server. Default: 127.0.0.1:8001 (grpc) or "
                                          ":8000 (http).")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True)
@click.option("--repository", type=click.Path(file_okay=False, path_type=Path), default=Path("build/model_repository"),
              show_default=True, help="The generated repository the server serves: the inputs, their ranges.")
@click.option("--dim", "default_dim", type=click.IntRange(1), default=16, show_default=True,
              help="Size of every variable dim that no --shape NAME:d1,d2 gives.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where input-data.json, perf.csv, perf_analyzer.log and results.json go. Default: build/perf/MODEL.")
@click.option("--perf-analyzer", "binary", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The binary. Default: $TOOLKIT_PERF_ANALYZER, .venv-perf/bin/perf_analyzer, PATH.")
@click.argument("perf_args", nargs=-1, type=click.UNPROCESSED)
def perf(model: str, url: str | None, protocol: str, repository: Path, default_dim: int, out: Path | None,
         binary: Path | None, perf_args: tuple[str, ...]) -> None:
    """Run Triton's perf_analyzer on MODEL with input data made from its spec.

    Every other option goes to perf_analyzer as it is, e.g. --concurrency-range 1:16:15
    --measurement-interval 5000 -p 2000 --shape input_ids:64 (put them after --).
    """
    from toolkit.bench.perf_analyzer import PerfRequest, find_perf_analyzer, profile
    from toolkit.client import normalize_url

    analyzer = find_perf_analyzer(binary)
    analyzer.version()  # a missing library fails here, before anything is measured
    url = normalize_url(url or f"127.0.0.1:{8001 if protocol == 'grpc' else 8000}")
    _check_reachable(f"triton-{protocol}", url, model)
    results = profile(PerfRequest(model, url, protocol, repository, out or Path("build/perf") / model,
                                  list(perf_args), default_dim), analyzer)
    for note in results["input_data"]:
        click.echo(f"input  {note}")
    for p in results["points"]:
        compute = p["server_compute_input_ms"] + p["server_compute_infer_ms"] + p["server_compute_output_ms"]
        click.echo(f"{p['load']}={p['value']:g}: {p['throughput']:.1f} infer/s  p50 {p['p50_ms']:.1f} ms  "
                   f"p99 {p['p99_ms']:.1f} ms  errors {p['errors']}  server queue {p['server_queue_ms']:.2f} ms  "
                   f"compute {compute:.2f} ms")
        for step in p["steps"]:
            click.echo(f"    {step['model']}: queue {step['queue_ms']:.2f} ms  compute {step['compute_ms']:.2f} ms")
    click.echo(f"Results: {(out or Path('build/perf') / model) / 'results.json'}")


@bench.command("compare")
@click.option("--workload", "workloads", type=click.Choice(["embedding", "short", "mobile"]), multiple=True,
              default=("embedding", "short", "mobile"), show_default=True,
              help="embedding: documentation sentences; short: 8-16 word sentences; mobile: JPEG images.")
@click.option("--bert-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("model_repository/bert/1"),
              show_default=True, help="Exported BERT version folder (toolkit export bert).")
@click.option("--int8-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("build/bench/bert-int8/1"),
              show_default=True, help="The int8 BERT (toolkit export bert --quantize int8) for toolkit-int8.")
@click.option("--mobilenet-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("model_repository/mobilenet/1"), show_default=True)
@click.option("--contenders", callback=lambda c, p, v: tuple(v.split(",")), default=",".join(DEFAULT_CONTENDERS),
              show_default=True, help="Peers run in their own virtualenvs (build/peers), created on first use.")
@click.option("--concurrency", callback=_numbers(int), default="1,16,64", show_default=True)
@click.option("--rate", callback=_numbers(float), default="", help="Open-loop Poisson rates (req/s).")
@click.option("--bulk", callback=_numbers(int), default="4,64", show_default=True,
              help="Bulk requests: CONCURRENCY,ITEMS per request (0,0 for none).")
@click.option("--seconds", type=float, default=10.0, show_default=True, help="Measurement window per point.")
@click.option("--warmup", type=float, default=3.0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("build/bench"),
              show_default=True, help="Where results.json, report.md and plot.png go.")
@click.option("--allow-unstable", is_flag=True, help="Report unsteady points instead of failing.")
@click.option("--peak-seconds", type=click.FloatRange(0), default=15.0, show_default=True,
              help="The matrix-product peak sweep before the contenders: the roofline (0: none).")
def compare_command(workloads, bert_dir, int8_dir, mobilenet_dir, contenders, concurrency, rate, bulk, seconds,
                    warmup, out, allow_unstable, peak_seconds) -> None:
    """The in-process limits, the toolkit's forms and every peer on the same inputs, in one run."""
    from toolkit.bench.compare import Plan, compare
    from toolkit.bench.runner import KNOWN_CONTENDERS
    from toolkit.bench.workloads import workload
    from toolkit.errors import BenchError

    unknown = set(contenders) - set(KNOWN_CONTENDERS)
    if unknown:
        raise click.BadParameter(f"unknown {sorted(unknown)}; choose from {KNOWN_CONTENDERS}",
                                 param_hint="--contenders")
    if len(bulk) != 2 or min(bulk) < 0:
        raise click.BadParameter(f"expected CONCURRENCY,ITEMS, got {bulk}", param_hint="--bulk")
    dirs = {"embedding": bert_dir, "short": bert_dir, "mobile": mobilenet_dir}
    for name in workloads:
        if not (dirs[name] / "model.onnx").is_file():
            raise BenchError(f"{dirs[name]}/model.onnx not found: export it first (see export/README.md)")
    if "toolkit-int8" in contenders and not (int8_dir / "model.onnx").is_file():
        raise BenchError(f"{int8_dir}/model.onnx not found: toolkit export bert --quantize int8 --out "
                         f"{int8_dir.parent} (./dev.sh bench does it)")
    plan = Plan(workloads=tuple(workload(n, dirs[n].absolute(), int8_dir.absolute()) for n in workloads),
                contenders=contenders, concurrencies=concurrency, rates=rate, bulk=tuple(bulk), warmup_s=warmup,
                measure_s=seconds, allow_unstable=allow_unstable, peak_s=peak_seconds)
    try:
        results = compare(plan, out)
    finally:
        if (out / "report.md").is_file():
            click.echo(f"Report: {out / 'report.md'}  plot: {out / 'plot.png'}")
    click.echo(json.dumps(results["targets"], indent=1))


@bench.command("gpu-check")
@click.option("--gpu-python", type=click.Path(dir_okay=False, path_type=Path), default=Path(".venv-gpu/bin/python"),
              show_default=True, help="The python whose onnxruntime is onnxruntime-gpu: it runs `toolkit serve`.")
@click.option("--root", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="The project: model_repository/ (with bert/1 exported) and ensembles/.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("build/gpu-check"),
              show_default=True, help="Where the exports, the repository, the logs and report.md go.")
@click.option("--deadline", type=click.IntRange(min=60), default=8 * 60, show_default=True,
              help="Seconds for the whole check (set-up not counted).")
def gpu_check(gpu_python: Path, root: Path, out: Path, deadline: int) -> None:
    """Serve bert and the embedding ensemble on this machine's NVIDIA GPU (fp32 and fp16), compare the
    vectors with the CPU's, run perf_analyzer at concurrency 1, 16, 64 and write a report
    (./dev.sh gpu-check installs what it needs first). Without a GPU: one error line, exit 1."""
    from toolkit.bench.gpu_check import GpuCheck, no_gpu_error, run

    refusal = no_gpu_error()  # before anything else: one line, never a silent skip
    if refusal is not None:
        raise refusal
    results = run(GpuCheck(root=root, gpu_python=gpu_python, out=out, deadline_s=deadline))
    for precision, cosine in results.get("cosine", {}).items():
        click.echo(f"{precision}: min cosine to the CPU {cosine['min']:.6f} (>= {cosine['threshold']})")
    for label, point in results.get("perf", {}).items():
        click.echo(f"{label}: {point['throughput']:.1f} infer/s  p50 {point['p50_ms']:.1f} ms  "
                   f"p99 {point['p99_ms']:.1f} ms")
    click.echo(f"gpu-check PASSED in {results['seconds']} s: {out / 'report.md'}")
