"""NVIDIA Triton Model Analyzer: found, configured for the bundled tritonserver, and run with a deadline.

Model Analyzer (``triton-model-analyzer``, py3-none-any) lives in ``.venv-tune``, which dev.sh's set-up makes:
its pins (numpy 2, tritonclient[all] 2.73 with the CUDA bindings) are not the project's. It drives the
perf_analyzer of ``.venv-perf`` (``toolkit bench perf``'s, the bundled server's release) through
``perf_analyzer_path``.

In its ``local`` launch mode it starts tritonserver itself, once per configuration, and loads the model
with the configuration to try through the repository API (explicit model control). So the config made
here hands it what ``toolkit/server/process.py`` gives every server it starts: the backend folder with the
stub built for this interpreter (``triton_server_flags``), and the environment in which the stub finds
this virtualenv's packages (``triton_server_environment``). Model Analyzer gives perf_analyzer that same
environment, so it also carries the CUDA runtime perf_analyzer links. Every port is on 127.0.0.1.
``strict-model-config: true`` is ``--disable-auto-complete-config`` (Model Analyzer's flag list cannot send
a flag without a value): gen-repo's configs are complete.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import TuneError
from toolkit.server.stubs import pids, remove_orphan_regions, stat_fields

ENV_BINARY = "TOOLKIT_MODEL_ANALYZER"
TUNE_VENV = ".venv-tune"
VERSION = "1.58.0"
INSTALL_HINT = f"./dev.sh setup installs it into {TUNE_VENV} (pip install triton-model-analyzer=={VERSION})"
#: Passed to the server's and perf_analyzer's environment (the rest of ours is inherited anyway).
SERVER_VARIABLES = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "OMP_NUM_THREADS")


@dataclass(frozen=True)
class ModelAnalyzer:
    path: Path

    def version(self) -> str:
        """Runs it once, so a broken install is one line here and not a traceback mid-search."""
        try:
            done = subprocess.run([str(self.path), "--version"], capture_output=True, text=True, timeout=60)
        except OSError as e:
            raise TuneError(f"Model Analyzer at {self.path} cannot start ({e}); {INSTALL_HINT}") from e
        except subprocess.TimeoutExpired as e:
            raise TuneError(f"Model Analyzer at {self.path} did not answer --version in 60 s") from e
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or not re.fullmatch(r"\d+\.\d+\.\d+\S*", text.splitlines()[-1] if text else ""):
            first = text.splitlines()[-1] if text else f"exit status {done.returncode}"
            raise TuneError(f"Model Analyzer at {self.path} cannot start: {first}; {INSTALL_HINT}")
        return text.splitlines()[-1]


def find_model_analyzer(explicit: Path | None = None) -> ModelAnalyzer:
    """``explicit``, else $TOOLKIT_MODEL_ANALYZER, else ``.venv-tune/bin/model-analyzer`` in the current folder
    or beside the toolkit's checkout, else ``model-analyzer`` on PATH."""
    chosen = explicit or (Path(os.environ[ENV_BINARY]) if os.environ.get(ENV_BINARY) else None)
    if chosen is not None:
        if not Path(chosen).is_file():
            raise TuneError(f"Model Analyzer not found at {chosen}; {INSTALL_HINT}")
        return ModelAnalyzer(Path(chosen).absolute())
    checkout = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), checkout):
        candidate = root / TUNE_VENV / "bin" / "model-analyzer"
        if candidate.is_file():
            return ModelAnalyzer(candidate.absolute())
    on_path = shutil.which("model-analyzer")
    if on_path:
        return ModelAnalyzer(Path(on_path))
    raise TuneError(f"Model Analyzer not found (no {TUNE_VENV}/bin/model-analyzer here or in {checkout}, none on "
                    f"PATH, ${ENV_BINARY} unset); {INSTALL_HINT}")


@dataclass(frozen=True)
class Measurement:
    """perf_analyzer's windows for each configuration: time windows of ``window_ms``, stable when three in a
    row agree within ``stability`` percent, at most ``max_trials``; when none are stable Model Analyzer
    widens the window by a second and tries again, at most ``auto_adjusts`` times."""

    window_ms: int = 2000
    stability: int = 25
    max_trials: int = 6
    auto_adjusts: int = 2

    def perf_analyzer_flags(self, input_data: Path) -> dict:
        return {"input-data": str(input_data), "measurement-mode": "time_windows",
                "measurement-interval": self.window_ms, "stability-percentage": self.stability,
                "max-trials": self.max_trials}


_FILES = {"repository": "repository", "backends": "backends", "input_data": "input-data.json",
          "config": "model-analyzer.yaml", "log": "model-analyzer.log", "server_log": "tritonserver.log",
          "perf_log": "perf_analyzer.log", "variants": "output_model_repository", "checkpoints": "checkpoints",
          "results": "results", "reports": "reports", "plots": "plots", "configs": "configs", "summary": "tune.json"}


@dataclass(frozen=True)
class Layout:
    """Where a tune run keeps its files (``build/tune/<model>/`` by default): the generated one-model
    repository, Model Analyzer's config, logs, CSVs and reports, each configuration tried, and tune.json."""

    out: Path

    def path(self, name: str) -> Path:
        return self.out / _FILES[name]

    repository = property(lambda self: self.path("repository"))
    backends = property(lambda self: self.path("backends"))
    input_data = property(lambda self: self.path("input_data"))
    config = property(lambda self: self.path("config"))
    log = property(lambda self: self.path("log"))
    server_log = property(lambda self: self.path("server_log"))
    perf_log = property(lambda self: self.path("perf_log"))
    variants = property(lambda self: self.path("variants"))
    checkpoints = property(lambda self: self.path("checkpoints"))
    results = property(lambda self: self.path("results"))
    configs = property(lambda self: self.path("configs"))
    summary = property(lambda self: self.path("summary"))

    def fresh(self) -> None:
        """A new run starts clean: Model Analyzer resumes from a checkpoint and appends to its logs."""
        for name in ("variants", "checkpoints", "results", "reports", "plots", "configs", "backends"):
            shutil.rmtree(self.path(name), ignore_errors=True)
        for name in ("log", "server_log", "perf_log", "summary"):
            self.path(name).unlink(missing_ok=True)


def analyzer_config(model: str, layout: Layout, *, tritonserver: Path, server_env: dict[str, str],
                    ports: tuple[int, int, int], perf_analyzer: Path, model_config_parameters: dict,
                    concurrency: tuple[int, ...], measurement: Measurement, max_p99_ms: float | None,
                    perf_timeout_s: int) -> dict:
    """Model Analyzer's profile config (its YAML) for one model of ``layout.repository``."""
    http, grpc, metrics = ports
    profile = {"cpu_only": True, "model_config_parameters": model_config_parameters,
               "parameters": {"concurrency": list(concurrency), "batch_sizes": [1]},
               "perf_analyzer_flags": measurement.perf_analyzer_flags(layout.input_data)}
    if max_p99_ms is not None:
        profile["constraints"] = {"perf_latency_p99": {"max": max_p99_ms}}
    return {
        "model_repository": str(layout.repository.absolute()),
        "profile_models": {model: profile},
        "run_config_search_disable": True,  # the manual sweep above, every combination
        "triton_launch_mode": "local",
        "triton_server_path": str(tritonserver),
        "triton_server_flags": {"backend-directory": str(layout.backends.absolute()), "http-address": "127.0.0.1",
                                "grpc-address": "127.0.0.1", "metrics-address": "127.0.0.1",
                                "strict-model-config": "true", "exit-timeout-secs": 30, "log-verbose": 0},
        "triton_server_environment": {k: server_env[k] for k in SERVER_VARIABLES if k in server_env},
        "triton_http_endpoint": f"127.0.0.1:{http}", "triton_grpc_endpoint": f"127.0.0.1:{grpc}",
        "triton_metrics_url": f"http://127.0.0.1:{metrics}/metrics",
        "client_protocol": "grpc",
        "triton_output_path": str(layout.server_log.absolute()),
        "perf_analyzer_path": str(perf_analyzer),
        "perf_analyzer_timeout": perf_timeout_s,
        "perf_analyzer_max_auto_adjusts": measurement.auto_adjusts,
        "perf_output": True, "perf_output_path": str(layout.perf_log.absolute()),
        "collect_cpu_metrics": False,  # Model Analyzer warns that collecting them disturbs the numbers
        "inference_output_fields": ["model_name", "batch_size", "concurrency", "model_config_path", "instance_group",
                                    "max_batch_size", "satisfies_constraints", "perf_throughput", "perf_latency_avg",
                                    "perf_latency_p99", "perf_server_queue", "perf_server_compute_infer"],
        "output_model_repository_path": str(layout.variants.absolute()),
        "override_output_model_repository": True,
        "checkpoint_directory": str(layout.checkpoints.absolute()),
        "export_path": str(layout.out.absolute()),
    }


def run_profile(analyzer: ModelAnalyzer, layout: Layout, env: dict[str, str], timeout_s: float,
                extra: Sequence[str] = (), on_line: Callable[[str], None] | None = None) -> None:
    """``model-analyzer profile -f <config>``, its output in ``layout.log``; stopped with everything it
    started (tritonserver runs in a session of its own) when ``timeout_s`` passes or on Ctrl-C."""
    command = [str(analyzer.path), "profile", "-f", str(layout.config.absolute()), *extra]
    started = time.time()
    with open(layout.log, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=layout.out, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                   start_new_session=True)
        reader = threading.Thread(target=_copy_lines, args=(process.stdout, log, on_line), daemon=True,
                                  name="model-analyzer-output")
        reader.start()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop_tree(process)
            raise TuneError(f"Model Analyzer did not finish within {timeout_s:.0f} s (stopped; a larger --timeout "
                            f"or a smaller search; its log: {layout.log})") from None
        except BaseException:  # Ctrl-C: nothing it started may outlive us
            _stop_tree(process)
            raise
        finally:
            reader.join(timeout=10)
            if process.returncode is None or process.returncode != 0:
                remove_orphan_regions(since=started)
    if process.returncode != 0:
        raise TuneError(f"Model Analyzer failed (exit status {process.returncode}): {failure_reason(layout.log)} "
                        f"(its log: {layout.log}; tritonserver's: {layout.server_log})")


def _copy_lines(stream, log, on_line: Callable[[str], None] | None) -> None:
    for line in stream:
        log.write(line)
        log.flush()
        if on_line is not None:
            on_line(line.rstrip("\n"))


_ERROR = re.compile(r"(?:TritonModelAnalyzerException|Model Analyzer encountered an error):?\s*(.*)$")


def failure_reason(log: Path) -> str:
    """The one line that says why: Model Analyzer's error message, else the log's last line."""
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    lines = [line for line in lines if line]
    for i in range(len(lines) - 1, -1, -1):
        match = _ERROR.search(lines[i])
        if match:
            message = match.group(1).removeprefix("Error:").strip() or (lines[i + 1] if i + 1 < len(lines) else "")
            return message[:500]
    return lines[-1][:500] if lines else "(empty log)"


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (Model Analyzer's tritonserver, its stubs, perf_analyzer), read from /proc."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        fields = stat_fields(pid)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_tree(process: subprocess.Popen) -> None:
    """SIGTERM what Model Analyzer started (tritonserver drains and removes its files), then SIGKILL what is
    left within 30 s. Only these processes, by pid."""
    below = _descendants(process.pid)
    for pid in below:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.2)
    for pid in below:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def _alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"
