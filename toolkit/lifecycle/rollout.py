"""Zero-downtime rollout and rollback of one model on a running tritonserver (explicit model control).

    rollout("bert", version=2, models_dir=Path("model_repository"), repository=Path("build/model_repository"),
            url="127.0.0.1:8000")

What happens, in an order that keeps the served version untouched until the new one has proven
itself (Triton's own reload keeps serving the old version while the new one loads):

0. **Files.** N's ``*.onnx`` and ``golden.npz`` are read as the operator wrote them: a truncated or
   corrupt one stops the rollout with one line naming it, before anything loads (and before the
   CLI says "Rolling out ...").
1. **Candidate.** Version N is rendered (config, adapter, hook code, assets: what gen-repo writes)
   into a model of its own, ``<model>__candidate``, beside the served one, and loaded. It takes no
   traffic: nothing routes to that name. A version that fails to load stops the rollout here.
2. **Golden check.** The inputs recorded in N's ``golden.npz`` (``toolkit export`` writes it) go to
   the candidate; its outputs must match the recorded ones within the recorded tolerance.
3. **Promote.** N's folder is moved into the served model (atomically), the served config's
   ``version_policy`` becomes ``specific: [N]`` (atomically), and the model is loaded again: Triton
   loads N, moves traffic to it once READY, then retires the old version after its in-flight
   requests finish. An ensemble over the model calls version -1 and follows. Each request runs
   wholly on one version.
4. **Clean up.** The candidate is unloaded and removed; ``rollout.json`` in the served model folder
   records the history: ``served``, the stack of versions rollouts put in place (``rollback`` pops
   one: again, and it goes further back, down to "no earlier version"), and ``log``, every change.

Any failure before step 3 leaves the served version serving, untouched, and raises ``LifecycleError``
with the reason. Old version folders stay on disk, so a rollback needs no files from the sources.

Rollout and rollback hold the repository's lock (``files.py``, which the server's heals
take too) from start to end: a second operator is refused at once, naming who holds it (or waits
``wait`` seconds). Holding it, they first remove what an operation that died half-way left behind
(a candidate, staging folders), so every path ends with nothing half-written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from toolkit.client.admin import TritonAdmin
from toolkit.errors import LifecycleError, ToolkitError, TritonAdminError
from toolkit.files import (
    CANDIDATE_SUFFIX,
    RepositoryLock,
    clean_leftovers,
    leftovers,
    replace_dir,
    staging_dir,
)
from toolkit.lifecycle.golden import GOLDEN_FILE, check_golden, read_golden
from toolkit.repository.project import ModelSource, load_model
from toolkit.repository.render import build_config_text

HISTORY_FILE = "rollout.json"
#: Seconds a rollout waits for a heal of the server's supervisor that holds the repository lock
#: (another rollout or rollback refuses it at once, unless --wait says otherwise).
HEAL_WAIT = 90.0
#: Seconds a load call may take: a candidate's load is as slow as the model (a big ONNX file).
LOAD_TIMEOUT = 300.0


@dataclass
class RolloutReport:
    model: str
    version: int
    previous: list[int]
    golden: str                      # "passed (N outputs)", or "skipped"
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        previous = ", ".join(map(str, self.previous)) or "none"
        return (f"model '{self.model}' now serves version {self.version} (was {previous}); "
                f"golden check {self.golden}; {steps}")


def _infer(admin: TritonAdmin, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One inference on the candidate (its golden check), with tritonclient over HTTP."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    client = httpclient.InferenceServerClient(admin.url, connection_timeout=60, network_timeout=60)
    try:
        items = []
        for name, array in inputs.items():
            item = httpclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            item.set_data_from_numpy(array, binary_data=True)
            items.append(item)
        result = client.infer(model, items, headers=admin.headers)
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}
    except InferenceServerException as e:
        raise LifecycleError(f"the candidate failed its golden request: {e.message()}") from e
    finally:
        client.close()


def rollout(model: str, *, version: int | None, models_dir: Path, repository: Path, admin: TritonAdmin,
            golden_check: bool = True, wait: float = 0.0,
            announce: Callable[[int], None] | None = None) -> RolloutReport:
    """Serve ``version`` of ``model`` (default: the newest in ``models_dir``) instead of what it serves.
    A version already in the served model folder (served before) is served from there.
    ``announce(version)`` is called once everything that needs no loading has been checked."""
    repository = Path(repository).absolute()
    with _changing(repository, f"rollout of '{model}'", admin, wait):
        served_dir = _served_dir(repository, model, admin)
        history = _history(served_dir)
        stack = history.served or _serving(admin, served_dir, model)
        source = None
        if version is None or not (served_dir / str(version)).is_dir():
            try:
                source = load_model(Path(models_dir) / model)
            except ToolkitError as e:
                raise LifecycleError(f"cannot read the spec of '{model}': {e}") from e
            version = version or max(source.versions, default=0)
            if version not in source.versions:
                raise LifecycleError(f"model '{model}' has no version {version} in {models_dir}/{model} "
                                     f"(it has {', '.join(map(str, source.versions)) or 'none'})")
        if (served_dir / str(version)).is_dir():
            source = None  # served before (a rollback went past it): the checked files are here
        report = _switch(model, version, source, repository, admin, golden_check, announce)
        _save_history(served_dir, history, [*stack, version], "rollout", report)
        return report


def rollback(model: str, *, repository: Path, admin: TritonAdmin, golden_check: bool = True,
             wait: float = 0.0, announce: Callable[[int], None] | None = None) -> RolloutReport:
    """Serve again the version ``model`` served before its last rollout; again, and it goes one more
    step back, until "no earlier version"."""
    repository = Path(repository).absolute()
    with _changing(repository, f"rollback of '{model}'", admin, wait):
        served_dir = _served_dir(repository, model, admin)
        history = _history(served_dir)
        stack = history.served or _serving(admin, served_dir, model)
        if len(stack) < 2:
            raise LifecycleError(f"model '{model}' has no earlier version to roll back to "
                                 f"(history: {', '.join(map(str, stack)) or 'none'})")
        previous = stack[-2]
        if not (served_dir / str(previous)).is_dir():
            raise LifecycleError(f"version {previous} of '{model}' is no longer in {served_dir}; "
                                 f"roll out a version instead")
        report = _switch(model, previous, None, repository, admin, golden_check, announce)
        _save_history(served_dir, history, stack[:-1], "rollback", report)
        return report


def _switch(model: str, version: int, source: ModelSource | None, repository: Path, admin: TritonAdmin,
            golden_check: bool, announce: Callable[[int], None] | None = None) -> RolloutReport:
    """Load ``version`` as the candidate, check it, promote it: steps 1-4 of the module docstring.
    ``source``: render the version from the spec (it is not in the served folder yet)."""
    served_dir = repository / model
    config = _read_config(served_dir / "config.pbtxt")
    serving = _serving(admin, served_dir, model)
    if serving == [version]:
        raise LifecycleError(f"model '{model}' already serves version {version}")
    # The files as the operator wrote them, read before anything loads: a corrupt one is one line
    # naming it, not Triton's load failure with the stub's stack.
    files_dir = source.folder / str(version) if source is not None else served_dir / str(version)
    _check_onnx_files(files_dir)
    golden = None
    if golden_check:
        if not (files_dir / GOLDEN_FILE).is_file():
            raise LifecycleError(f"version {version} of '{model}' has no {GOLDEN_FILE} to check it with "
                                 "(toolkit export writes one; a python hook ships its own), or pass "
                                 "--skip-golden-check")
        golden = read_golden(files_dir / GOLDEN_FILE)
    source_dir = _render_version(source, version, config, repository) if source is not None else None
    if announce is not None:
        announce(version)
    report = RolloutReport(model, version, serving, "skipped")
    candidate = model + CANDIDATE_SUFFIX
    started = time.monotonic()
    try:
        _write_candidate(repository / candidate, config, candidate, version,
                         source_dir if source_dir is not None else served_dir / str(version))
        try:
            admin.load(candidate, timeout=LOAD_TIMEOUT)
        except TritonAdminError as e:
            raise LifecycleError(f"version {version} of '{model}' failed to load (as '{candidate}'); still serving "
                                 f"{', '.join(map(str, serving)) or 'nothing'}: {_first_line(str(e))}") from e
        report.seconds["candidate load"] = time.monotonic() - started
        if golden is not None:
            problems = check_golden(golden, lambda inputs: _infer(admin, candidate, inputs))
            if problems:
                raise LifecycleError(f"version {version} of '{model}' failed its golden check; still serving "
                                     f"{', '.join(map(str, serving)) or 'nothing'}:\n  " + "\n  ".join(problems))
            report.golden = f"passed ({len(golden.outputs)} outputs within {golden.describe()})"
        report.seconds["golden check"] = time.monotonic() - started - report.seconds["candidate load"]
        promoted = time.monotonic()
        if source_dir is not None:
            _move_into(source_dir, served_dir / str(version))
            source_dir = None
        _write_policy(served_dir / "config.pbtxt", config, version)
        try:
            admin.load(model, timeout=LOAD_TIMEOUT)
        except TritonAdminError:
            _write_policy(served_dir / "config.pbtxt", config, None)  # Triton kept the old version serving
            raise
        deadline = time.monotonic() + 60
        while not admin.ready(model, version):
            if time.monotonic() > deadline:
                raise LifecycleError(f"version {version} of '{model}' loaded but is not READY after 60s")
            time.sleep(0.05)
        report.seconds["switch"] = time.monotonic() - promoted
    finally:
        with contextlib.suppress(TritonAdminError):
            admin.unload(candidate, timeout=60)
        shutil.rmtree(repository / candidate, ignore_errors=True)
        if source_dir is not None:
            shutil.rmtree(source_dir.parent, ignore_errors=True)  # the staging folder it was rendered in
    return report


@contextlib.contextmanager
def _changing(repository: Path, purpose: str, admin: TritonAdmin, wait: float) -> Iterator[None]:
    """Hold the repository's lock; first remove what a change that died half-way left behind."""
    # a heal of the server's supervisor takes seconds: wait for it rather than refuse
    with RepositoryLock(repository).hold(purpose, wait=wait, heal_wait=HEAL_WAIT), _as_lifecycle_errors():
        for path in leftovers(repository):
            if path.name.endswith(CANDIDATE_SUFFIX):
                _retire_candidate(admin, path.name)
        clean_leftovers(repository)
        yield


@contextlib.contextmanager
def _as_lifecycle_errors() -> Iterator[None]:
    """An admin call that failed is a rollout that could not be done (the served version serves)."""
    try:
        yield
    except TritonAdminError as e:
        raise LifecycleError(str(e)) from e


def _retire_candidate(admin: TritonAdmin, name: str, timeout: float = 120.0) -> None:
    """Unload the candidate a rollout that died left in Triton, before its files go: deleting the
    folder of a model Triton is still loading fails its stubs and can leave it LOADING for good."""
    deadline = time.monotonic() + timeout
    while True:
        states = {m.get("state") for m in admin.index() if m.get("name") == name}
        if "LOADING" not in states:
            break
        if time.monotonic() > deadline:
            raise LifecycleError(f"Triton is still loading '{name}', which a rollout that died left behind, "
                                 f"after {timeout:.0f}s; retry when it is done")
        time.sleep(0.2)
    if "READY" in states:
        with contextlib.suppress(TritonAdminError):  # the index below says whether it went
            admin.unload(name, timeout=60)
        while any(m.get("name") == name and m.get("state") in ("READY", "UNLOADING")
                  for m in admin.index()):
            if time.monotonic() > deadline:
                raise LifecycleError(f"Triton did not unload '{name}' (left by a rollout that died) "
                                     f"within {timeout:.0f}s; retry later")
            time.sleep(0.2)


def _served_dir(repository: Path, model: str, admin: TritonAdmin) -> Path:
    served_dir = repository / model
    if not (served_dir / "config.pbtxt").is_file():
        raise LifecycleError(f"'{model}' is not a model of the served repository {repository} "
                             f"(it has {', '.join(_models(repository)) or 'none'})")
    if not any(m["name"] == model and m.get("state") == "READY" for m in admin.index()):
        raise LifecycleError(f"model '{model}' is not served (READY) at {admin.url}")
    return served_dir


def _serving(admin: TritonAdmin, served_dir: Path, model: str) -> list[int]:
    return [v for v in _versions(served_dir) if admin.ready(model, v)] if served_dir.is_dir() else []


@dataclass
class ModelVersions:
    """What ``toolkit versions MODEL`` shows."""

    model: str
    serving: list[int]          # READY in Triton now
    on_disk: list[int]          # version folders of the served model (a rollback can go to these)
    in_sources: list[int]       # version folders in the model sources (a rollout can go to these)
    history: list[int]          # the rollout stack: rollback serves history[-2]
    candidate: str | None       # a rollout in progress (or left behind), and who holds the lock
    log: list[dict]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def render(self) -> str:
        def line(label: str, versions: list[int]) -> str:
            return f"  {label:<11}{', '.join(map(str, versions)) or 'none'}"

        back = f"version {self.history[-2]}" if len(self.history) >= 2 else "no earlier version"
        lines = [f"model '{self.model}'", line("serving", self.serving), line("history", self.history),
                 f"  {'rollback':<11}{back}", line("on disk", self.on_disk), line("sources", self.in_sources),
                 f"  {'candidate':<11}{self.candidate or 'none'}"]
        for event in self.log[-5:]:
            lines.append(f"  {event.get('at', '?')}  {event.get('action')} to {event.get('version')} "
                         f"(was {', '.join(map(str, event.get('from', []))) or 'none'})")
        return "\n".join(lines)


def versions(model: str, *, repository: Path, admin: TritonAdmin, models_dir: Path | None = None) -> ModelVersions:
    """Served, candidate and available versions of ``model`` (reads only; takes no lock)."""
    repository = Path(repository).absolute()
    served_dir = repository / model
    if not (served_dir / "config.pbtxt").is_file():
        raise LifecycleError(f"'{model}' is not a model of the served repository {repository} "
                             f"(it has {', '.join(_models(repository)) or 'none'})")
    history = _history(served_dir)
    sources = []
    if models_dir is not None and (Path(models_dir) / model).is_dir():
        sources = _versions(Path(models_dir) / model)
    lock = RepositoryLock(repository)
    candidate = None
    if (repository / (model + CANDIDATE_SUFFIX)).exists():
        candidate = f"{model + CANDIDATE_SUFFIX} (held by {lock.holder()})"
    with _as_lifecycle_errors():
        serving = _serving(admin, served_dir, model)
    return ModelVersions(model, serving, _versions(served_dir), sources, history.served, candidate, history.log)


# --- files ------------------------------------------------------------------------------------------

def _check_onnx_files(folder: Path) -> None:
    """Every ``*.onnx`` of a version folder parses as an ONNX model with a graph (a truncated copy
    does not; an empty file parses as a model without one)."""
    paths = sorted(folder.glob("*.onnx"))
    if not paths:
        return
    import onnx
    from google.protobuf.message import DecodeError

    for path in paths:
        try:
            model = onnx.load(str(path), load_external_data=False)
            reason = "" if model.HasField("graph") and model.graph.output else "it holds no graph"
        except (DecodeError, OSError, ValueError, RuntimeError) as e:
            reason = _first_line(str(e)) or type(e).__name__
        if reason:
            raise LifecycleError(f"{path}: not a readable ONNX model ({reason}; {path.stat().st_size} bytes): "
                                 "is it truncated? export it again")


def _first_line(text: str) -> str:
    """The first line of a multi-line reason (Triton's load failures carry the stub's stack)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[0] + (" (the server's log has the rest)" if len(lines) > 1 else "")


def _models(repository: Path) -> list[str]:
    return sorted(d.name for d in repository.iterdir() if (d / "config.pbtxt").is_file()) \
        if repository.is_dir() else []


def _versions(folder: Path) -> list[int]:
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def _read_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def _render_version(source: ModelSource, version: int, served: model_config_pb2.ModelConfig,
                    repository: Path) -> Path:
    """Version ``version`` as gen-repo writes it, in a hidden folder of the served repository."""
    from toolkit.repository.versions import write_versions

    target = "container" if served.backend == "onnxruntime" else "embedded"
    try:
        build_config_text(source, source_label=str(source.folder), target=target)  # validates the spec
    except ToolkitError as e:
        raise LifecycleError(f"the spec of '{source.spec.name}' does not validate: {e}") from e
    staging = staging_dir(repository / f".{source.spec.name}.v{version}")
    try:
        write_versions(source, staging, target, versions=[version])  # type: ignore[arg-type]
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging / str(version)


def _write_candidate(folder: Path, config: model_config_pb2.ModelConfig, name: str, version: int,
                     version_dir: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    staging = staging_dir(folder)
    candidate = model_config_pb2.ModelConfig()
    candidate.CopyFrom(config)
    candidate.name = name
    candidate.version_policy.specific.versions[:] = [version]
    (staging / "config.pbtxt").write_text(text_format.MessageToString(candidate), encoding="utf-8")
    shutil.copytree(version_dir, staging / str(version), copy_function=_link_or_copy)
    replace_dir(staging, folder)


def _move_into(version_dir: Path, target: Path) -> None:
    if target.exists():
        raise LifecycleError(f"{target} appeared during the rollout; not replacing it")
    os.replace(version_dir, target)
    shutil.rmtree(version_dir.parent, ignore_errors=True)


def _write_policy(path: Path, config: model_config_pb2.ModelConfig, version: int | None) -> None:
    updated = model_config_pb2.ModelConfig()
    updated.CopyFrom(config)
    if version is not None:
        updated.version_policy.specific.versions[:] = [version]
    text = ("# Written by `toolkit rollout` (version_policy) from the config gen-repo wrote.\n"
            + text_format.MessageToString(updated)) if version is not None else text_format.MessageToString(config)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class _History:
    served: list[int]
    log: list[dict]


def _history(folder: Path) -> _History:
    try:
        data = json.loads((folder / HISTORY_FILE).read_text())
        return _History([int(v) for v in data["served"]], list(data.get("log", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return _History([], [])


def _save_history(folder: Path, history: _History, stack: list[int], action: str, report: RolloutReport) -> None:
    event = {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": action,
             "version": report.version, "from": report.previous}
    data = {"served": stack, "log": [*history.log, event][-100:]}
    tmp = folder / f".{HISTORY_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, folder / HISTORY_FILE)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
