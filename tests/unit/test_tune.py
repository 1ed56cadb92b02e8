"""`toolkit tune` without a server: the search ranges against the spec, Model Analyzer's config, reading its
CSV and the configurations it tried, writing the winner into model.yaml with its comments, and the one-line
errors for a wrong model or a missing Model Analyzer / perf_analyzer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from toolkit.cli.main import cli
from toolkit.errors import TuneError
from toolkit.repository.spec import DynamicBatching, ModelSpec
from toolkit.tune.analyzer import Layout, Measurement, analyzer_config, failure_reason
from toolkit.tune.apply import apply_changes
from toolkit.tune.results import Values, read_outcome
from toolkit.tune.search import SearchSpace

ROOT = Path(__file__).resolve().parents[2]


def spec(max_batch_size=64, preferred=(8,), delay=0, batching=True, instances=2) -> ModelSpec:
    dynamic = DynamicBatching(max_queue_delay_microseconds=delay, preferred_batch_size=list(preferred)) \
        if batching else None
    return ModelSpec(name="m", kind="onnx", max_batch_size=max_batch_size, dynamic_batching=dynamic,
                     instance_count=instances)


def test_search_defaults_are_one_and_two_instances_the_committed_batch_size_and_a_quarter_no_and_2ms_delay():
    sweep = SearchSpace().resolve(spec())
    assert (sweep.instance_counts, sweep.max_batch_sizes, sweep.queue_delays_us, sweep.concurrency) == \
        ((1, 2), (16, 64), (0, 2000), (8,))
    assert sweep.size == 1 + 2 * 2 * 2
    assert sweep.model_config_parameters() == {
        "instance_group": [{"kind": "KIND_CPU", "count": [1, 2]}], "max_batch_size": [16, 64],
        "dynamic_batching": {"max_queue_delay_microseconds": [0, 2000]}}


def test_search_default_batch_sizes_never_go_below_the_largest_preferred_batch_size():
    assert SearchSpace().resolve(spec(max_batch_size=8, preferred=(4, 8))).max_batch_sizes == (8,)


def test_search_refuses_max_batch_sizes_below_the_preferred_batch_size_naming_the_option():
    with pytest.raises(TuneError, match=r"--max-batch-sizes 2,4: below the preferred_batch_size 8 of model 'm'"):
        SearchSpace(max_batch_sizes=(2, 4, 16)).resolve(spec())


def test_search_refuses_queue_delays_for_a_model_without_dynamic_batching():
    assert SearchSpace().resolve(spec(batching=False)).queue_delays_us == ()
    with pytest.raises(TuneError, match="--queue-delays: model 'm' has no dynamic_batching"):
        SearchSpace(queue_delays_us=(0, 100)).resolve(spec(batching=False))


def test_search_of_a_model_that_does_not_batch_varies_only_instances():
    sweep = SearchSpace().resolve(spec(max_batch_size=0, batching=False))
    assert sweep.model_config_parameters() == {"instance_group": [{"kind": "KIND_CPU", "count": [1, 2]}]}
    with pytest.raises(TuneError, match="--max-batch-sizes: model 'm' does not batch"):
        SearchSpace(max_batch_sizes=(8,)).resolve(spec(max_batch_size=0, batching=False))


def test_search_refuses_zero_instances():
    with pytest.raises(TuneError, match="--instances: expected values from 1 to 64, got 0,2"):
        SearchSpace(instance_counts=(0, 2)).resolve(spec())


def test_model_analyzer_config_runs_the_bundled_server_on_loopback_with_the_stubs_environment(tmp_path):
    layout = Layout(tmp_path)
    config = analyzer_config("bert", layout, tritonserver=Path("/x/bin/tritonserver"),
                             server_env={"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/src", "HOME": "/root",
                                         "LD_LIBRARY_PATH": "/lib/cudart"},
                             ports=(1, 2, 3), perf_analyzer=Path("/p/perf_analyzer"),
                             model_config_parameters={"instance_group": [{"kind": "KIND_CPU", "count": [1]}]},
                             concurrency=(4, 8), measurement=Measurement(window_ms=500), max_p99_ms=50.0,
                             perf_timeout_s=60)
    flags = config["triton_server_flags"]
    assert flags["backend-directory"] == str(tmp_path / "backends")
    assert flags["http-address"] == flags["grpc-address"] == flags["metrics-address"] == "127.0.0.1"
    assert flags["strict-model-config"] == "true"  # = --disable-auto-complete-config
    assert config["triton_server_environment"] == {"PATH": "/venv/bin:/usr/bin", "PYTHONPATH": "/src",
                                                   "LD_LIBRARY_PATH": "/lib/cudart"}
    assert (config["triton_launch_mode"], config["run_config_search_disable"]) == ("local", True)
    assert config["triton_grpc_endpoint"] == "127.0.0.1:2" and config["triton_metrics_url"].startswith("http://127.")
    profile = config["profile_models"]["bert"]
    assert profile["cpu_only"] is True and profile["parameters"]["concurrency"] == [4, 8]
    assert profile["constraints"] == {"perf_latency_p99": {"max": 50.0}}
    assert profile["perf_analyzer_flags"]["input-data"] == str(tmp_path / "input-data.json")
    assert profile["perf_analyzer_flags"]["measurement-interval"] == 500
    yaml.safe_dump(config)  # what tune writes


CSV_HEADER = ("Model,Batch,Concurrency,Model Config Path,Instance Group,Max Batch Size,Satisfies Constraints,"
              "Throughput (infer/sec),Avg Latency (ms),p99 Latency (ms),Server Queue time (ms),"
              "Server Compute Infer time (ms)\n")


def variant(root: Path, name: str, count: int, mbs: int, delay: int) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(
        f'name: "m"\nbackend: "python"\nmax_batch_size: {mbs}\ninstance_group {{ count: {count} kind: KIND_CPU }}\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}\n")


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """What Model Analyzer leaves: its CSV (throughput first, as it writes it) and the configurations tried."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "metrics-model-inference.csv").write_text(
        CSV_HEADER
        + "m,1,8,m_config_1,2:CPU,16,Yes,120.0,60.1,90.5,3.0,40.0\n"
        + "m,1,8,m_config_default,2:CPU,64,Yes,100.0,70.2,120.4,5.0,41.0\n"
        + "m,1,8,m_config_0,1:CPU,16,No,104.0,75.0,600.0,,\n")
    variant(tmp_path / "variants", "m_config_default", 2, 64, 0)
    variant(tmp_path / "variants", "m_config_0", 1, 16, 0)
    variant(tmp_path / "variants", "m_config_1", 2, 16, 2000)
    variant(tmp_path / "variants", "m_config_2", 1, 64, 2000)  # loaded, never measured
    return tmp_path


def test_results_name_the_winner_within_constraints_and_the_committed_config_at_its_concurrency(finished_run):
    outcome = read_outcome("m", finished_run, finished_run / "variants", finished_run / "configs")
    assert [t.variant for t in outcome.trials] == ["m_config_default", "m_config_1", "m_config_0"]
    assert outcome.winner.variant == "m_config_1" and outcome.winner.values == Values(2, 16, 2000)
    assert outcome.committed.variant == "m_config_default" and outcome.committed.committed
    assert outcome.gain == pytest.approx(20.0)
    assert outcome.changes == {"max_batch_size": (64, 16), "max_queue_delay_microseconds": (0, 2000)}
    assert not outcome.trials[2].satisfies and outcome.trials[2].server_queue_ms is None
    assert outcome.unmeasured == {"m_config_2": Values(1, 64, 2000)}
    assert sorted(p.name for p in (finished_run / "configs").iterdir()) == [
        "m_config_0.pbtxt", "m_config_1.pbtxt", "m_config_2.pbtxt", "m_config_default.pbtxt"]


def test_results_keep_the_committed_config_when_the_winner_gains_less_than_min_gain(finished_run):
    outcome = read_outcome("m", finished_run, finished_run / "variants", finished_run / "configs", min_gain=25)
    assert outcome.winner.variant == "m_config_1" and outcome.changes == {}


def test_results_without_a_csv_are_one_error(tmp_path):
    with pytest.raises(TuneError, match=r"wrote no .*metrics-model-inference\.csv: no configuration was measured"):
        read_outcome("m", tmp_path, tmp_path / "variants", tmp_path / "configs")


def test_failure_reason_is_model_analyzers_own_message(tmp_path):
    log = tmp_path / "ma.log"
    log.write_text("[Model Analyzer] Starting\nTraceback (most recent call last):\n  File x\n"
                   "model_analyzer.model_analyzer_exceptions.TritonModelAnalyzerException: The first 2 attempts to "
                   "acquire measurements have failed. Please examine the Tritonserver/PA error logs\n")
    assert failure_reason(log).startswith("The first 2 attempts to acquire measurements have failed.")
    log.write_text("[Model Analyzer] Model Analyzer encountered an error: \n"
                   "If `dcgm-disable` then `triton-launch-mode` must be set to remote\n")
    assert failure_reason(log) == "If `dcgm-disable` then `triton-launch-mode` must be set to remote"


@pytest.fixture
def bert_yaml(tmp_path) -> Path:
    """The example's own bert/model.yaml (comments and all), copied."""
    folder = tmp_path / "bert"
    folder.mkdir()
    shutil.copyfile(ROOT / "model_repository" / "bert" / "model.yaml", folder / "model.yaml")
    return folder / "model.yaml"


def test_apply_changes_values_in_place_and_keeps_every_comment(bert_yaml):
    before = bert_yaml.read_text()
    after = apply_changes(bert_yaml, {"instance_count": 1, "max_batch_size": 16,
                                      "max_queue_delay_microseconds": 2000})
    assert bert_yaml.read_text() == after
    data = yaml.safe_load(after)
    assert (data["instance_count"], data["max_batch_size"]) == (1, 16)
    assert data["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    assert data["dynamic_batching"]["preferred_batch_size"] == [8]
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    assert comments == [line.split("#", 1)[1] for line in after.splitlines() if "#" in line]
    assert len(after.splitlines()) == len(before.splitlines())


def test_apply_adds_fields_the_file_does_not_have(tmp_path):
    path = tmp_path / "m" / "model.yaml"
    path.parent.mkdir()
    path.write_text("kind: onnx\nmax_batch_size: 8\ndynamic_batching:\n  preferred_batch_size: [4]\n")
    apply_changes(path, {"instance_count": 2, "max_queue_delay_microseconds": 500})
    data = yaml.safe_load(path.read_text())
    assert data["instance_count"] == 2 and data["dynamic_batching"] == {"max_queue_delay_microseconds": 500,
                                                                         "preferred_batch_size": [4]}
    path.write_text("kind: onnx\nmax_batch_size: 8\ndynamic_batching: {preferred_batch_size: [4]}\n")
    apply_changes(path, {"max_queue_delay_microseconds": 100})
    assert yaml.safe_load(path.read_text())["dynamic_batching"]["max_queue_delay_microseconds"] == 100


def test_apply_refuses_values_that_make_the_spec_invalid_and_writes_nothing(bert_yaml):
    before = bert_yaml.read_text()
    with pytest.raises(TuneError, match="would make it invalid, not written"):
        apply_changes(bert_yaml, {"max_batch_size": 4})  # below preferred_batch_size 8
    assert bert_yaml.read_text() == before


def run(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["tune", *args], env=env)


def test_tune_of_an_unknown_model_is_one_line_listing_the_models():
    result = run("nope", "--models", str(ROOT / "model_repository"))
    assert result.exit_code == 1
    assert result.output == (f"Error: no model 'nope' in {ROOT / 'model_repository'} (it has bert, mobilenet, "
                             "pooling, preprocess, tokenizer; --models chooses another folder)\n")


@pytest.fixture
def python_model(tmp_path) -> Path:
    models = tmp_path / "models"
    (models / "echo").mkdir(parents=True)
    (models / "echo" / "model.yaml").write_text(
        "kind: python\nhook: echo:Echo\nmax_batch_size: 8\ndynamic_batching: {}\n"
        "inputs: [{name: X, dtype: FP32, dims: [4]}]\noutputs: [{name: Y, dtype: FP32, dims: [4]}]\n")
    (models / "echo" / "echo.py").write_text("from toolkit.hooks import Hook\n\n\nclass Echo(Hook):\n"
                                             "    def infer(self, batch):\n        return {'Y': batch['X']}\n")
    return models


def test_tune_without_model_analyzer_is_one_line_with_the_install_step(python_model, tmp_path):
    result = run("echo", "--models", str(python_model), "--perf-analyzer", "/bin/true",
                 env={"TOOLKIT_MODEL_ANALYZER": str(tmp_path / "nowhere" / "model-analyzer")})
    assert result.exit_code == 1
    assert result.output == (f"Error: Model Analyzer not found at {tmp_path}/nowhere/model-analyzer; ./dev.sh setup "
                             "installs it into .venv-tune (pip install triton-model-analyzer==1.58.0)\n")


def test_tune_without_perf_analyzer_is_one_line_with_the_install_step(python_model, tmp_path):
    result = run("echo", "--models", str(python_model), "--perf-analyzer", str(tmp_path / "perf_analyzer"))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert result.output.startswith(f"Error: perf_analyzer not found at {tmp_path}/perf_analyzer; ./dev.sh setup "
                                    "installs it into .venv-perf")


def test_tune_with_a_model_analyzer_that_does_not_start_is_one_line(python_model, tmp_path):
    broken = tmp_path / "model-analyzer"
    broken.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named model_analyzer' >&2\nexit 1\n")
    broken.chmod(0o755)
    perf = tmp_path / "perf_analyzer"
    perf.write_text("#!/bin/sh\necho 'Perf Analyzer Version 2.51.0'\n")
    perf.chmod(0o755)
    result = run("echo", "--models", str(python_model), "--model-analyzer", str(broken), "--perf-analyzer", str(perf))
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output == (f"Error: Model Analyzer at {broken} cannot start: ModuleNotFoundError: No module named "
                             "model_analyzer; ./dev.sh setup installs it into .venv-tune (pip install "
                             "triton-model-analyzer==1.58.0)\n")


def test_tune_refuses_a_range_the_spec_cannot_take_before_anything_runs(python_model):
    result = run("echo", "--models", str(python_model), "--max-batch-sizes", "0")
    assert result.exit_code == 1
    assert result.output == "Error: --max-batch-sizes: expected values from 1 to 1048576, got 0\n"


def test_a_twin_of_the_committed_config_is_the_baseline_when_it_measured_better(finished_run):
    """The sweep can hold the committed values again: the same configuration, measured twice."""
    csv = finished_run / "results" / "metrics-model-inference.csv"
    csv.write_text(csv.read_text() + "m,1,8,m_config_3,2:CPU,64,Yes,112.0,65.0,100.0,4.0,40.0\n")
    variant(finished_run / "variants", "m_config_3", 2, 64, 0)
    outcome = read_outcome("m", finished_run, finished_run / "variants", finished_run / "configs", min_gain=5)
    assert [t.variant for t in outcome.twins] == ["m_config_3"] and outcome.baseline == 112.0
    assert outcome.gain == pytest.approx(100 * (120 / 112 - 1))
    assert outcome.changes == {"max_batch_size": (64, 16), "max_queue_delay_microseconds": (0, 2000)}
    outcome = read_outcome("m", finished_run, finished_run / "variants", finished_run / "configs", min_gain=10)
    assert outcome.changes == {}  # +7 % over the better of the two: within this run's noise


def test_default_ranges_always_hold_the_committed_values_so_the_sweep_measures_it_again():
    sweep = SearchSpace().resolve(spec(instances=4, delay=500))
    assert sweep.instance_counts == (1, 2, 4) and sweep.queue_delays_us == (0, 500, 2000) and sweep.holds_committed
    assert not SearchSpace(instance_counts=(1,)).resolve(spec()).holds_committed
    assert not SearchSpace(max_batch_sizes=(16,)).resolve(spec()).holds_committed
