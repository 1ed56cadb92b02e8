"""Targets, the markdown table and the plot, from one run's results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Throughput the toolkit must reach at concurrency 16, as a multiple of the naive server's.
NAIVE_MULTIPLE = {"embedding": 1.3, "mobile": 1.5}


def _closed(points: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {int(p["value"]): p for p in points if p["load"] == "concurrency"}


def evaluate_targets(workloads: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 4's targets as ratios from this run; a target whose contenders were not run is skipped."""
    targets = []

    def add(workload: str, name: str, measured: float, goal: str, met: bool) -> None:
        targets.append({"workload": workload, "target": name, "measured": measured, "goal": goal, "met": bool(met)})

    for name, data in workloads.items():
        limit = data.get("inprocess", {}).get("limit")
        toolkit = _closed(data.get("toolkit", {}).get("points", []))
        naive = _closed(data.get("naive", {}).get("points", []))
        pytriton = _closed(data.get("pytriton", {}).get("points", []))
        if limit and toolkit:
            best = max(p["throughput"] for p in toolkit.values())
            add(name, "best throughput / in-process limit", best / limit["best_throughput"], ">= 0.85",
                best >= 0.85 * limit["best_throughput"])
            if 1 in toolkit:
                gap = toolkit[1]["p50_ms"] - limit["batch1_p50_ms"]
                add(name, "p50 at concurrency 1 minus in-process batch-1 p50 (ms)", gap, "<= 2", gap <= 2)
        if 16 in toolkit and 16 in naive:
            ratio = toolkit[16]["throughput"] / naive[16]["throughput"]
            need = NAIVE_MULTIPLE.get(name, 1.3)
            add(name, "throughput at c=16 / naive", ratio, f">= {need}", ratio >= need)
            add(name, "p99 at c=16: toolkit / naive", toolkit[16]["p99_ms"] / naive[16]["p99_ms"], "< 1",
                toolkit[16]["p99_ms"] < naive[16]["p99_ms"])
        if 16 in toolkit and 16 in pytriton:
            ratio = toolkit[16]["throughput"] / pytriton[16]["throughput"]
            add(name, "throughput at c=16 / PyTriton", ratio, ">= 1", ratio >= 1)
            p99 = toolkit[16]["p99_ms"] / pytriton[16]["p99_ms"]
            add(name, "p99 at c=16: toolkit / PyTriton", p99, "<= 1", p99 <= 1)
    return targets


def write_markdown(results: dict[str, Any], path: Path) -> None:
    lines = ["# Benchmark results", ""]
    m = results["machine"]
    lines += [f"Machine: {m['cores']} cores, {m['cpu']}; Python {m['python']}; "
              + ", ".join(f"{k} {v}" for k, v in m.items() if k not in ("cores", "cpu", "python")), ""]
    plan = results["plan"]
    lines += [f"Load: closed loop at concurrency {plan['concurrencies']}"
              + (f", open loop (Poisson) at {plan['rates']} req/s" if plan["rates"] else "")
              + f"; {plan['warmup_s']} s warm-up, {plan['measure_s']} s window per point; one item per request.", ""]
    for name, data in results["workloads"].items():
        lines += [f"## {name}", ""]
        limit = data.get("inprocess", {}).get("limit")
        if limit:
            per_batch = ", ".join(f"b={b}: {t:.1f}/s" for b, t in limit["throughput"].items())
            runs = limit.get("runs", [limit])
            lines += [f"In-process limit (a): **{limit['best_throughput']:.1f} items/s** at batch "
                      f"{limit['best_batch']} ({per_batch}); batch-1 p50 {limit['batch1_p50_ms']:.2f} ms. "
                      f"Measured before and after the servers: "
                      + " / ".join(f"{r['best_throughput']:.1f}" for r in runs) + " items/s; the higher counts.", ""]
        lines += ["| contender | load | req/s | p50 ms | p95 ms | p99 ms | errors | queue ms | compute ms | cv |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for contender, entry in data.items():
            for p in entry.get("points", []):
                load = f"c={p['value']}" if p["load"] == "concurrency" else f"{p['value']}/s"
                server = (f"{p['queue_ms']:.2f} | {p['compute_ms']:.2f}" if "queue_ms" in p else "- | -")
                lines.append(f"| {contender} | {load} | {p['throughput']:.1f} | {p['p50_ms']:.1f} | {p['p95_ms']:.1f} "
                             f"| {p['p99_ms']:.1f} | {p['errors']} | {server} | {p['variation']:.2f} |")
        lines.append("")
    lines += ["## Targets", "", "| workload | target | measured | goal | met |", "| --- | --- | ---: | --- | --- |"]
    for t in results["targets"]:
        lines.append(f"| {t['workload']} | {t['target']} | {t['measured']:.2f} | {t['goal']} | "
                     f"{'yes' if t['met'] else '**no**'} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(workloads: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(workloads), 2, figsize=(11, 4 * len(workloads)), squeeze=False)
    for row, (name, data) in enumerate(workloads.items()):
        thr_ax, p99_ax = axes[row]
        for contender, entry in data.items():
            closed = sorted(_closed(entry.get("points", [])).items())
            if closed:
                xs = [c for c, _ in closed]
                thr_ax.plot(xs, [p["throughput"] for _, p in closed], marker="o", label=contender)
                p99_ax.plot(xs, [p["p99_ms"] for _, p in closed], marker="o", label=contender)
        limit = data.get("inprocess", {}).get("limit")
        if limit:
            thr_ax.axhline(limit["best_throughput"], color="grey", linestyle="--", label="in-process limit")
        for ax, label in ((thr_ax, "throughput (items/s)"), (p99_ax, "p99 latency (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
