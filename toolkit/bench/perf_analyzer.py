"""Running Triton's perf_analyzer against a served model, and reading its results.

perf_analyzer comes from the ``tritonclient==2.51.0`` manylinux wheel (r24.10, the release of the bundled
tritonserver), which dev.sh installs into ``.venv-perf`` (its own venv: the project pins tritonclient
2.73.0, whose wheel has no binary). The binary links ``libb64.so.0d`` (Debian's ``libb64-0d``) and
``libcudart.so.12``, which comes from the ``nvidia-cuda-runtime-cu12`` wheel in the same venv and is
found through the ``LD_LIBRARY_PATH`` this module sets; no GPU is needed.

perf_analyzer stops at the first failed request (exit status 99, ``Thread [0] had error: ...``), so a
run that completes had no failed request. Its ``-f`` CSV has the client's throughput and latency
percentiles and the server-side split of the model asked for; the split of an ensemble's steps is
only in its text output ("Composing models"), which is parsed too.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.errors import BenchError

ENV_BINARY = "TOOLKIT_PERF_ANALYZER"
PERF_VENV = ".venv-perf"
INSTALL_HINT = ("./dev.sh setup installs it into .venv-perf (tritonclient==2.51.0 and nvidia-cuda-runtime-cu12, "
                "apt-get install libb64-0d)")
#: Options the toolkit sets itself: the model, the server, the protocol and the CSV it parses.
OWN_OPTIONS = {"-m": "MODEL", "-u": "--url", "-i": "--protocol", "-f": "--out"}


@dataclass(frozen=True)
class PerfAnalyzer:
    path: Path
    env: dict[str, str]

    def version(self) -> str:
        """Runs the binary once: a missing library shows up here, in one line, not mid-measurement."""
        try:
            done = subprocess.run([str(self.path), "--version"], env=self.env, capture_output=True, text=True,
                                  timeout=30)
        except OSError as e:
            raise BenchError(f"perf_analyzer at {self.path} cannot start ({e}); {INSTALL_HINT}") from e
        except subprocess.TimeoutExpired as e:
            raise BenchError(f"perf_analyzer at {self.path} did not answer --version in 30 s") from e
        text = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or "Perf Analyzer Version" not in text:
            first = text.splitlines()[0] if text else f"exit status {done.returncode}"
            raise BenchError(f"perf_analyzer at {self.path} cannot start: {first}; {INSTALL_HINT}")
        return text.splitlines()[0]


def find_perf_analyzer(explicit: Path | None = None) -> PerfAnalyzer:
    """The binary: ``explicit``, else $TOOLKIT_PERF_ANALYZER, else ``.venv-perf/bin/perf_analyzer`` in the
    current folder or beside the toolkit's checkout, else ``perf_analyzer`` on PATH."""
    chosen = explicit or (Path(os.environ[ENV_BINARY]) if os.environ.get(ENV_BINARY) else None)
    if chosen is not None:
        if not Path(chosen).is_file():
            raise BenchError(f"perf_analyzer not found at {chosen}; {INSTALL_HINT}")
        return PerfAnalyzer(Path(chosen).absolute(), _environment(Path(chosen).absolute()))
    checkout = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), checkout):
        candidate = root / PERF_VENV / "bin" / "perf_analyzer"
        if candidate.is_file():
            return PerfAnalyzer(candidate.absolute(), _environment(candidate.absolute()))
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return PerfAnalyzer(Path(on_path), _environment(Path(on_path)))
    raise BenchError(f"perf_analyzer not found (no {PERF_VENV}/bin/perf_analyzer here or in {checkout}, none on "
                     f"PATH, ${ENV_BINARY} unset); {INSTALL_HINT}")


def _environment(binary: Path) -> dict[str, str]:
    """The environment with the venv's CUDA runtime (the nvidia-cuda-runtime-cu12 wheel) on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    venv = binary.parent.parent
    libs = sorted(str(p) for p in venv.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib") if p.is_dir())
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH", "")] if p])
    return env


@dataclass
class StepSplit:
    """One composing model's server-side average per request (perf_analyzer's "Composing models")."""

    model: str
    queue_ms: float
    compute_ms: float  # input + infer + output
    compute_infer_ms: float


@dataclass
class PerfPoint:
    load: str  # concurrency | request rate
    value: float
    throughput: float  # inferences/s as perf_analyzer counts them
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float | None
    server_queue_ms: float
    server_compute_input_ms: float
    server_compute_infer_ms: float
    server_compute_output_ms: float
    errors: int = 0  # perf_analyzer stops at the first failure: a parsed point had none
    steps: list[StepSplit] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def perf_command(binary: PerfAnalyzer, model: str, url: str, protocol: str, data_file: Path | None, csv_file: Path,
                 extra: list[str]) -> list[str]:
    command = [str(binary.path), "-m", model, "-u", url, "-i", protocol, "-f", str(csv_file)]
    if data_file is not None:
        command += ["--input-data", str(data_file)]
    return command + list(extra)


def run_perf(command: list[str], env: dict[str, str], log_file: Path, timeout_s: float | None = None) -> str:
    """Runs perf_analyzer, its output saved to ``log_file``; a failure is one BenchError naming its reason."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"perf_analyzer did not finish in {timeout_s:.0f} s") from e
    output = done.stdout + done.stderr
    log_file.write_text(output, encoding="utf-8")
    if done.returncode != 0:
        raise BenchError(f"perf_analyzer failed (exit status {done.returncode}): {failure_reason(output)} "
                         f"(its output: {log_file})")
    return output


def failure_reason(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "had error:" in line:
            return line.split("had error:", 1)[1].strip()
    for line in lines:
        if "stable measurement" in line:
            return (f"{line} (a busy machine: raise --measurement-interval or --max-trials, or loosen "
                    "--stability-percentage)")
    for line in lines:
        if line.lower().startswith(("error", "failed")) or "error:" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def parse_csv(path: Path) -> list[PerfPoint]:
    """perf_analyzer's ``-f`` file: one row per load point, latencies in microseconds."""
    if not path.is_file():
        raise BenchError(f"perf_analyzer wrote no results file ({path})")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f) if row and any(row.values())]
    if not rows:
        raise BenchError(f"{path} holds no measurement")
    points = []
    for row in rows:
        load = "concurrency" if "Concurrency" in row else "request rate"
        key = "Concurrency" if load == "concurrency" else "Request Rate"
        try:
            points.append(PerfPoint(
                load=load, value=float(row[key]), throughput=float(row["Inferences/Second"]),
                p50_ms=_ms(row["p50 latency"]), p90_ms=_ms(row["p90 latency"]), p95_ms=_ms(row["p95 latency"]),
                p99_ms=_ms(row["p99 latency"]), avg_ms=_ms(row["Avg latency"]) if row.get("Avg latency") else None,
                server_queue_ms=_ms(row["Server Queue"]), server_compute_input_ms=_ms(row["Server Compute Input"]),
                server_compute_infer_ms=_ms(row["Server Compute Infer"]),
                server_compute_output_ms=_ms(row["Server Compute Output"])))
        except (KeyError, TypeError, ValueError) as e:
            raise BenchError(f"{path}: unexpected perf_analyzer CSV ({e}); columns: {sorted(row)}") from e
    return sorted(points, key=lambda p: p.value)  # perf_analyzer writes its rows by throughput, not load


_SECTION = re.compile(r"^(Request concurrency|Request Rate): ([0-9.]+)", re.M)
_MODEL = re.compile(r"^\s+(\S+), version: \S+\s*$")
_SPLIT = re.compile(r"Avg request latency: \d+ usec \(overhead \d+ usec \+ queue (\d+) usec \+ compute input (\d+) "
                    r"usec \+ compute infer (\d+) usec \+ compute output (\d+) usec\)")


def parse_steps(output: str) -> dict[float, list[StepSplit]]:
    """Each load point's composing models (an ensemble's steps), from perf_analyzer's text output."""
    found: dict[float, list[StepSplit]] = {}
    sections = list(_SECTION.finditer(output))
    for i, section in enumerate(sections):
        end = sections[i + 1].start() if i + 1 < len(sections) else len(output)
        body = output[section.end():end]
        if "Composing models:" not in body:
            continue
        steps, model = [], None
        for line in body.split("Composing models:", 1)[1].splitlines():
            if (m := _MODEL.match(line)) is not None:
                model = m.group(1)
            elif model and (m := _SPLIT.search(line)) is not None:
                queue, c_in, c_infer, c_out = (int(v) / 1000 for v in m.groups())
                steps.append(StepSplit(model, queue, c_in + c_infer + c_out, c_infer))
                model = None
        found[float(section.group(2))] = steps
    return found


def _ms(usec: str) -> float:
    return float(usec) / 1000.0


@dataclass
class PerfRequest:
    """One `toolkit bench perf` run: what to measure and where its files go."""

    model: str
    url: str  # host:port
    protocol: str  # grpc | http
    repository: Path  # the generated repository the server serves (config.pbtxt, export.json)
    out: Path  # input-data.json, perf.csv, perf_analyzer.log, results.json
    extra: list[str] = field(default_factory=list)  # perf_analyzer's own options, passed through
    default_dim: int = 16
    timeout_s: float | None = None


def passthrough_shapes(extra: list[str]) -> tuple[dict[str, list[int]], bool]:
    """The ``--shape NAME:d1,d2`` values among perf_analyzer's options, and whether they bring their own
    ``--input-data``; the options the toolkit sets itself are refused, naming the toolkit's."""
    shapes: dict[str, list[int]] = {}
    own_data = False
    for i, arg in enumerate(extra):
        flag, eq, inline = arg.partition("=")
        if flag in OWN_OPTIONS or (len(arg) > 2 and arg[:2] in OWN_OPTIONS and not arg.startswith("--")):
            raise BenchError(f"{arg[:2]} is set by toolkit bench perf: use {OWN_OPTIONS[arg[:2]]} instead")
        if flag == "--input-data":
            own_data = True
        if flag == "--shape":
            value = inline if eq else (extra[i + 1] if i + 1 < len(extra) else "")
            try:
                name, dims = parse_shape(value)
            except ValueError:
                raise BenchError(f"--shape {value!r}: expected NAME:d1,d2,... (perf_analyzer's form, no batch dim)") \
                    from None
            shapes[name] = dims
    return shapes, own_data


def parse_shape(value: str) -> tuple[str, list[int]]:
    """perf_analyzer's ``NAME:d1,d2,...`` (no batch dim); ValueError if it is not that."""
    name, sep, dims = value.rpartition(":")
    if not sep or not name:
        raise ValueError(value)
    return name, [int(d) for d in dims.split(",")]


def profile(request: PerfRequest, binary: PerfAnalyzer | None = None) -> dict:
    """Writes the input data, runs perf_analyzer, and returns (and saves as results.json) its numbers."""
    import json

    from toolkit.bench.perf_data import input_data

    binary = binary or find_perf_analyzer()
    version = binary.version()
    shapes, own_data = passthrough_shapes(request.extra)
    out = request.out
    out.mkdir(parents=True, exist_ok=True)
    data_file, notes = None, ["--input-data: the user's own"]
    if not own_data:
        data = input_data(request.repository, request.model, shapes, request.default_dim)
        data_file, notes = data.write(out / "input-data.json"), data.notes
    csv_file = out / "perf.csv"
    csv_file.unlink(missing_ok=True)  # a stale file from an earlier run must not pass for this one
    command = perf_command(binary, request.model, request.url, request.protocol, data_file, csv_file, request.extra)
    output = run_perf(command, binary.env, out / "perf_analyzer.log", request.timeout_s)
    points = parse_csv(csv_file)
    steps = parse_steps(output)
    for point in points:
        point.steps = steps.get(point.value, [])
    results = {"model": request.model, "url": request.url, "protocol": request.protocol, "perf_analyzer": version,
               "command": command, "input_data": notes, "points": [p.to_dict() for p in points]}
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results
