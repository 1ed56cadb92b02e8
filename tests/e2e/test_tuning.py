"""`toolkit tune` for real: Triton's Model Analyzer (from .venv-tune, which dev.sh's set-up makes) starts the
bundled tritonserver once per configuration of a tiny python model and measures it with perf_analyzer
(.venv-perf), in short windows.

The model sleeps 4 ms per row, so its throughput is set by how many instances sleep at once: two instances
beat the committed one by far more than any noise of a busy machine, and --apply must write
`instance_count: 2` into its model.yaml, keeping the file's comments.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.errors import TuneError
from toolkit.tune import find_model_analyzer

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(300)]

SLEEPY_HOOK = '''
import time

from toolkit.hooks import Hook


class Sleepy(Hook):
    def infer(self, batch):
        time.sleep(0.004 * len(batch["X"]))
        return {"Y": batch["X"]}
'''
BROKEN_HOOK = '''
from toolkit.hooks import Hook


class Broken(Hook):
    def init(self, ctx):
        raise RuntimeError("this hook cannot start")

    def infer(self, batch):
        return {"Y": batch["X"]}
'''
SPEC = """# Sleeps 4 ms per row: instances decide its throughput.
kind: python
hook: {module}
max_batch_size: 8
dynamic_batching:
  max_queue_delay_microseconds: 0   # no waiting for more rows
inputs: [{{name: X, dtype: FP32, dims: [4]}}]
outputs: [{{name: Y, dtype: FP32, dims: [4]}}]
instance_count: 1   # one worker
"""
#: Two configurations (the committed one and two instances), windows of 0.5 s.
SHORT = ["--instances", "2", "--max-batch-sizes", "8", "--queue-delays", "0", "--concurrency", "4",
         "--window-ms", "500", "--stability", "50", "--timeout", "240"]


@pytest.fixture(scope="module", autouse=True)
def model_analyzer():
    try:
        return find_model_analyzer()
    except TuneError as e:
        pytest.skip(f"the tune venv is absent: {e}")


def project(root: Path, name: str, module: str, code: str) -> Path:
    folder = root / "models" / name
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(SPEC.format(module=module))
    (folder / f"{module.split(':')[0]}.py").write_text(code)
    return root / "models"


def left_running(marker: str) -> list[int]:
    """Processes whose command line names this run's folder (a tritonserver or stub Model Analyzer started)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry))
    return found


def test_tune_measures_the_committed_config_and_two_instances_and_applies_the_winner(tmp_path):
    models = project(tmp_path, "sleepy", "sleepy:Sleepy", SLEEPY_HOOK)
    out = tmp_path / "tune"
    result = CliRunner().invoke(cli, ["tune", "sleepy", "--models", str(models), "--out", str(out), "--apply", *SHORT])
    assert result.exit_code == 0, result.output + (out / "model-analyzer.log").read_text()
    summary = json.loads((out / "tune.json").read_text())
    trials = {t["variant"]: t for t in summary["trials"]}
    assert set(trials) == {"sleepy_config_default", "sleepy_config_0"}
    committed, two = trials["sleepy_config_default"], trials["sleepy_config_0"]
    assert committed["committed"] and committed["values"]["instance_count"] == 1
    assert two["values"] == {"instance_count": 2, "max_batch_size": 8, "max_queue_delay_microseconds": 0}
    assert all(t["throughput"] > 0 and t["p99_ms"] > 0 and t["concurrency"] == 4 for t in trials.values())
    assert two["throughput"] > 1.3 * committed["throughput"]  # ~2x: two sleepers at once
    assert summary["winner"] == "sleepy_config_0" and summary["applied"] == {"instance_count": [1, 2]}
    assert "sleepy_config_0" in result.output and "<- winner" in result.output
    assert "Applied to " in result.output and "instance_count 1 -> 2" in result.output
    spec = (models / "sleepy" / "model.yaml").read_text()
    assert yaml.safe_load(spec)["instance_count"] == 2
    assert "instance_count: 2   # one worker" in spec and spec.startswith("# Sleeps 4 ms per row")
    # Model Analyzer's own report and every configuration it tried are kept; its copy of the model is not
    assert (out / "reports" / "summaries" / "sleepy").is_dir() and (out / "results").is_dir()
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["sleepy_config_0.pbtxt",
                                                                   "sleepy_config_default.pbtxt"]
    assert not (out / "output_model_repository").exists()
    assert left_running(str(out)) == []


def test_a_model_that_fails_to_load_is_one_error_line_naming_the_logs(tmp_path):
    models = project(tmp_path, "broken", "broken:Broken", BROKEN_HOOK)
    out = tmp_path / "tune"
    result = CliRunner().invoke(cli, ["tune", "broken", "--models", str(models), "--out", str(out), *SHORT])
    assert result.exit_code == 1
    error = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and error[0] == result.output.splitlines()[-1]
    assert error[0].startswith("Error: Model Analyzer failed (exit status 1): ")
    assert f"(its log: {out / 'model-analyzer.log'}; tritonserver's: {out / 'tritonserver.log'})" in error[0]
    assert "this hook cannot start" in (out / "tritonserver.log").read_text()
    assert left_running(str(out)) == []


def test_a_search_past_its_timeout_is_stopped_with_everything_it_started(tmp_path):
    models = project(tmp_path, "sleepy", "sleepy:Sleepy", SLEEPY_HOOK)
    out = tmp_path / "tune"
    result = CliRunner().invoke(cli, ["tune", "sleepy", "--models", str(models), "--out", str(out), *SHORT,
                                      "--timeout", "12"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"Error: Model Analyzer did not finish within 12 s (stopped; a larger --timeout or a smaller search; "
        f"its log: {out / 'model-analyzer.log'})")
    assert "Starting a local Triton Server" in (out / "model-analyzer.log").read_text()
    assert left_running(str(out)) == []
    assert "instance_count: 1   # one worker" in (models / "sleepy" / "model.yaml").read_text()
