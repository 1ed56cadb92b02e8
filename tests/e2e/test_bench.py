"""`toolkit bench` for real, with short windows: every contender runs and the report is written.

The numbers of these short runs are not checked against the targets (that is BENCHMARKS.md's job on
a quiet machine); what is checked is that the machinery measures, reports and fails loudly.
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from serving import free_ports

from toolkit.bench.compare import Plan, compare
from toolkit.bench.workloads import workload
from toolkit.cli.main import cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_compare_measures_every_contender_and_writes_report_and_plot(tmp_path, minilm_export):
    plan = Plan(workloads=(workload("short", minilm_export),), concurrencies=(1, 16), bulk=(2, 8), warmup_s=0.5,
                measure_s=1.5, batch_sizes=(1, 8), limit_s=0.3, allow_unstable=True,
                contenders=("inprocess", "naive", "pytriton", "toolkit", "toolkit-fused"), peak_s=0.5)
    results = compare(plan, tmp_path, progress=False)
    data = results["workloads"]["short"]
    assert set(data) == {"inprocess", "naive", "pytriton", "toolkit", "toolkit-fused"}
    peak = results["roofline"]["peak_gflops"]
    assert peak > 0 and len(results["roofline"]["shapes"]) == 7 and "vnni" in results["machine"]["cpu_features"]
    flops = results["flops"]["short"]
    assert flops["formula"]["linear"] == 21_233_664 and 8 <= flops["tokens_mean"] <= flops["tokens_max"] <= 64
    limit = data["inprocess"]["limit"]
    assert limit["best_throughput"] > 0 and limit["batch1_p50_ms"] > 0 and len(limit["runs"]) == 2
    assert limit["gflops"] == pytest.approx(limit["best_throughput"] * flops["per_item_mean"] / 1e9)
    assert set(limit["stream"][16]["rates"]) == {"alone", "sorted groups of 4", "sorted groups of 8",
                                                 "sorted groups of 16"}
    for contender in ("naive", "pytriton", "toolkit", "toolkit-fused"):
        points = data[contender]["points"]
        assert [(p["load"], p["value"], p["items"]) for p in points] == [
            ("concurrency", 1, 1), ("concurrency", 16, 1), ("bulk", 2, 8)]
        assert all(p["errors"] == 0 and p["completed"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0 for p in points)
        assert points[2]["items_per_s"] == pytest.approx(points[2]["throughput"] * 8)
        assert all(p["gflops"] > 0 and p["roofline"] == pytest.approx(p["gflops"] / peak) for p in points)
    toolkit_split = data["toolkit"]["points"][1]
    assert toolkit_split["compute_ms"] > 0 and toolkit_split["queue_ms"] >= 0  # from Triton's statistics
    names = [t["target"] for t in results["targets"]]
    assert "toolkit-fused: c=16 throughput / stream limit" in names and "toolkit: bulk items/s / offline limit" in names
    assert "toolkit-fused: c=16 p99 / pytriton" in names and "toolkit: p50 at c=1 minus naive's (ms)" in names
    report = (tmp_path / "report.md").read_text()
    assert "| toolkit-fused | c=16 |" in report and "| naive | bulk c=2 x8 |" in report
    assert "Stream limit at c=16" in report and "Offline limit" in report
    assert "## Roofline" in report and "| GFLOP/s | roofline |" in report
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["cores"] >= 1


def test_a_contender_that_cannot_start_is_reported_and_the_run_goes_on(tmp_path, minilm_export):
    plan = Plan(workloads=(workload("short", minilm_export),), concurrencies=(1,), bulk=(0, 0), warmup_s=0.2,
                measure_s=0.5, contenders=("toolkit-int8", "naive"), allow_unstable=True)
    results = compare(plan, tmp_path, progress=False)  # no int8 export given: toolkit-int8 cannot start
    data = results["workloads"]["short"]
    assert "needs the embedding workload and an int8 export" in data["toolkit-int8"]["failed"]
    assert data["naive"]["points"][0]["completed"] > 0
    assert "**toolkit-int8 failed**" in (tmp_path / "report.md").read_text()


def test_bench_load_drives_a_running_server_closed_and_open_loop(example_server):
    result = CliRunner().invoke(cli, ["bench", "load", "--url", example_server.grpc_url, "--model", "embedding",
                                      "--concurrency", "2", "--rate", "20", "--seconds", "1", "--warmup", "0.5"])
    assert result.exit_code == 0, result.output
    assert "concurrency=2:" in result.output and "rate=20.0:" in result.output and "errors 0" in result.output


def test_bench_load_fails_loudly_when_no_server_answers():
    port = free_ports(1)[0]
    result = CliRunner().invoke(cli, ["bench", "load", "--url", f"127.0.0.1:{port}", "--concurrency", "1",
                                      "--seconds", "0.5", "--warmup", "0"])
    assert result.exit_code == 1
    assert f"cannot reach Triton at 127.0.0.1:{port}" in result.output and "errors" not in result.output
