"""``toolkit bench compare``: every contender, every workload, one run; then targets, table and plot."""

from __future__ import annotations

import contextlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from toolkit.bench.loadgen import PointSpec, run_point
from toolkit.bench.peers import WORKLOADS as PEER_WORKLOADS
from toolkit.bench.report import evaluate_targets, write_markdown, write_plot
from toolkit.bench.roofline import cpu_features, measure_peak, workload_flops
from toolkit.bench.runner import CONTENDERS, best_limits, measure_limit, measure_point, serve
from toolkit.bench.workloads import Workload
from toolkit.errors import BenchError, ToolkitError


@dataclass(frozen=True)
class Plan:
    workloads: tuple[Workload, ...]
    contenders: tuple[str, ...] = CONTENDERS
    concurrencies: tuple[int, ...] = (1, 16, 64)
    rates: tuple[float, ...] = ()
    #: Bulk requests: (concurrency, items per request); (0, 0) for none.
    bulk: tuple[int, int] = (4, 64)
    warmup_s: float = 3.0
    measure_s: float = 10.0
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    #: Seconds (at least one whole pass over the items) per in-process limit measurement.
    limit_s: float = 3.0
    max_variation: float = 0.25
    allow_unstable: bool = False
    #: Seconds of the matrix-product peak sweep before the contenders (0: no roofline).
    peak_s: float = 15.0


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    from importlib.metadata import version

    versions = {p: version(p) for p in ("nvidia-pytriton", "tritonclient", "onnxruntime", "numpy", "fastapi",
                                          "uvicorn", "tokenizers")}
    return {"cores": len(os.sched_getaffinity(0)), "cpu": cpu, "python": platform.python_version(), **versions,
            "cpu_features": cpu_features()}


def compare(plan: Plan, out: Path, *, progress: bool = True) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    servers = [c for c in plan.contenders if c != "inprocess"]
    loads = [("concurrency", c, 1) for c in plan.concurrencies] + [("rate", r, 1) for r in plan.rates]
    if plan.bulk[0] > 0:
        loads.append(("concurrency", plan.bulk[0], plan.bulk[1]))  # items capped per workload below
    total = len(plan.workloads) * (len(servers) * len(loads) + 2 * ("inprocess" in plan.contenders))
    results: dict[str, Any] = {"machine": machine(), "plan": _plan_dict(plan), "workloads": {}, "flops": {}}
    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("benchmark", total=total)
        if plan.peak_s > 0:
            bar.update(task, description="the matrix-product peak")
            results["roofline"] = measure_peak(plan.peak_s)
        peak = results.get("roofline", {}).get("peak_gflops")
        for work in plan.workloads:
            payloads = work.payloads()
            try:
                flops, results["flops"][work.name] = workload_flops(
                    "image" if work.model == "mobile" else "text", work.model_dir, payloads)
            except BenchError as e:  # no GFLOP/s for this workload; its req/s and p99 still count
                flops, results["flops"][work.name] = [], {"failed": str(e)[:500]}
                bar.console.print(f"[red]{work.name}: FLOPs not counted: {e}")
            point_peak = peak if flops else None
            per_contender: dict[str, Any] = {}

            limit_args = (work.model, work.model_dir, list(plan.batch_sizes), plan.limit_s,
                          [c for c in plan.concurrencies if c > 1], payloads)
            if "inprocess" in plan.contenders:
                bar.update(task, description=f"{work.name}: in-process limits")
                first = measure_limit(*limit_args)
                bar.advance(task)
            for contender in servers:
                bar.update(task, description=f"{work.name}: starting {contender}")
                points = []
                served = PEER_WORKLOADS.get(contender) or (("embedding",) if contender == "toolkit-int8" else None)
                if served and work.model not in served:
                    per_contender[contender] = {"skipped": f"n/a: {contender} serves {', '.join(served)} only"}
                    bar.advance(task, len(loads))
                    continue
                try:
                    with serve(contender, work, out) as (target, stats_url):
                        run_point(PointSpec(target, payloads, concurrency=4, warmup_s=0, measure_s=plan.warmup_s))
                        models = work.steps if contender == "toolkit" else (work.model,)
                        for kind, value, items in loads:
                            items = min(items, work.max_items)
                            bar.update(task, description=f"{work.name}: {contender} {kind} {value} x{items}")
                            spec = PointSpec(target, payloads, warmup_s=min(2.0, plan.warmup_s),
                                             measure_s=plan.measure_s, items=items, flops=tuple(flops),
                                             **{kind: value})
                            result, server_split = measure_point(spec, stats_url, models, plan.max_variation)
                            points.append({"load": "bulk" if items > 1 else kind, "value": value,
                                           **result.to_dict(), **server_split,
                                           **_roofline(result.gflops, point_peak)})
                            bar.advance(task)
                except (BenchError, ToolkitError, OSError) as e:  # reported, and the run goes on
                    per_contender[contender] = {"failed": f"{type(e).__name__}: {e}"[:500], "points": points}
                    bar.console.print(f"[red]{work.name}: {contender} failed: {e}")
                    continue
                per_contender[contender] = {"points": points}
            if "inprocess" in plan.contenders:
                bar.update(task, description=f"{work.name}: in-process limits again")
                limit = best_limits(first, measure_limit(*limit_args))
                if flops:
                    _limit_roofline(limit, results["flops"][work.name]["per_item_mean"], peak)
                per_contender["inprocess"] = {"limit": limit}
                bar.advance(task)
            results["workloads"][work.name] = per_contender
    results["targets"] = evaluate_targets(results["workloads"], results["machine"]["cpu_features"])
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_markdown(results, out / "report.md")
    write_plot(results["workloads"], out / "plot.png")
    _fail_if_untrustworthy(results, plan)
    return results


def _roofline(gflops: float, peak: float | None) -> dict[str, float]:
    """A point's share of the machine's matrix-product peak (nothing without a peak)."""
    return {"roofline": gflops / peak} if peak else {}


def _limit_roofline(limit: dict[str, Any], flops_per_item: float, peak: float | None) -> None:
    """The limits' GFLOP/s: whole passes over the corpus, so its mean FLOPs per item are exact."""
    for where in (limit, *limit.get("stream", {}).values()):
        key = "best_throughput" if where is limit else "throughput"
        where["gflops"] = where[key] * flops_per_item / 1e9
        where.update(_roofline(where["gflops"], peak))


def _plan_dict(plan: Plan) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.__dict__.items() if k != "workloads"} | {
        "workloads": {w.name: str(w.model_dir) for w in plan.workloads}}


def _fail_if_untrustworthy(results: dict[str, Any], plan: Plan) -> None:
    errors, unsteady = [], []
    for name, contenders in results["workloads"].items():
        for contender, data in contenders.items():
            for p in data.get("points", []):
                where = f"{name}/{contender} {p['load']} {p['value']}"
                if p["errors"]:
                    errors.append(f"{where}: {p['errors']} errors, e.g. {p['error_samples'][:1]}")
                if p["variation"] > plan.max_variation:
                    unsteady.append(f"{where}: throughput varied {p['variation']:.0%} across the window")
    if errors:
        raise BenchError("requests failed (see report.md):\n" + "\n".join(errors))
    if unsteady and not plan.allow_unstable:
        raise BenchError("the run was too unsteady to trust (rerun on a quiet machine, or pass --allow-unstable):\n"
                         + "\n".join(unsteady))
