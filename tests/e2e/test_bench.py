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
from toolkit.bench.runner import workload
from toolkit.cli.main import cli

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_compare_measures_every_contender_and_writes_report_and_plot(tmp_path, minilm_export):
    plan = Plan(workloads=(workload("embedding", minilm_export),), concurrencies=(1, 16), warmup_s=0.5,
                measure_s=1.5, batch_sizes=(1, 8), allow_unstable=True)
    results = compare(plan, tmp_path, progress=False)
    data = results["workloads"]["embedding"]
    assert set(data) == {"inprocess", "naive", "pytriton", "toolkit"}
    assert data["inprocess"]["limit"]["best_throughput"] > 0 and data["inprocess"]["limit"]["batch1_p50_ms"] > 0
    for contender in ("naive", "pytriton", "toolkit"):
        points = data[contender]["points"]
        assert [p["value"] for p in points] == [1, 16]
        assert all(p["errors"] == 0 and p["completed"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0 for p in points)
    toolkit_split = data["toolkit"]["points"][1]
    assert toolkit_split["compute_ms"] > 0 and toolkit_split["queue_ms"] >= 0  # from Triton's statistics
    assert len([t for t in results["targets"] if t["workload"] == "embedding"]) == 6
    report = (tmp_path / "report.md").read_text()
    assert "| toolkit | c=16 |" in report and "| naive | c=1 |" in report and "In-process limit (a)" in report
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["cores"] >= 1


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
