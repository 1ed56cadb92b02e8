"""What the supervisor (``toolkit/server/supervisor.py``) observes: the python stubs of a running tritonserver,
which of them died, and the shared memory they leave behind.

Triton's python backend (24.10) never restarts a stub that died (an OOM kill, a segfault in a native
library): every request routed to that instance then fails with ``Stub process '<instance>' is not
healthy`` for as long as the server runs, while the model and the server keep saying READY. What the
backend does do, and what this module builds on:

- a stub is a direct child of tritonserver whose command line names its model file, its shared-memory
  region and its instance (``triton_python_backend_stub <repo>/<model>/<version>/model.py <region>
  ... <instance>``);
- tritonserver reaps a stub only when it unloads the model, so a stub that died on its own stays a
  *zombie*: a zombie stub is a crash, a stub that vanished was unloaded on purpose;
- unloading and loading the model again through the repository API (explicit model control) starts
  fresh stubs; a model whose instances are all dead is unloaded first, so the model's and the
  server's readiness say "not ready" until it serves again; a model with live instances left is
  reloaded in place (a config override bumps ``toolkit.restarts``) and keeps serving meanwhile;
- the dead stub's ``/dev/shm`` region is removed by the watchdog once the stub is gone, since the
  backend cannot always do it (a request that failed on a dead stub keeps the old model version
  referenced forever: tritonserver then hangs on it at exit, which ``TritonServer.stop`` handles).

The supervisor is a thread of the process that started tritonserver (``toolkit serve``, or a test);
it scans ``/proc`` every ``interval`` seconds, which is the detection window.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
#: Config parameter bumped by an in-place reload (Triton reloads only a model whose config changed).
RESTARTS_PARAMETER = "toolkit.restarts"
#: A zombie seen this long is a crash, not a stub between its exit and tritonserver's waitpid.
_ZOMBIE_GRACE = 0.15


@dataclass(frozen=True)
class Stub:
    """One python stub process of a running tritonserver."""

    pid: int
    model: str
    version: str
    instance: str
    shm_region: str

    @classmethod
    def from_argv(cls, pid: int, argv: list[str]) -> Stub | None:
        if len(argv) < 9 or not argv[0].endswith(STUB_BINARY):
            return None
        model_file = Path(argv[1])
        return cls(pid, model_file.parent.parent.name, model_file.parent.name, argv[8], argv[2])


def stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name: [0] the state letter, [1] the parent,
    [2] the process group, [49] a zombie's exit status; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def exit_status(pid: int) -> int | None:
    """A zombie's wait status as waitpid would report it (/proc/PID/stat field 52): 0 for a clean
    exit, the signal number for a kill; None when it cannot be read (gone, or an old kernel)."""
    fields = stat_fields(pid)
    try:
        return int(fields[49]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def _children(parent: int) -> dict[int, tuple[str, list[str]]]:
    """pid -> (state letter, argv) of ``parent``'s children (argv is empty for a zombie)."""
    out = {}
    for pid in pids():
        fields = stat_fields(pid)
        try:
            if fields is None or int(fields[1]) != parent:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        out[pid] = (fields[0], argv)
    return out


REGION_PREFIX = "triton_python_backend_shm_region_"


def remove_orphan_regions(directory: Path = SHM_DIR, min_age: float = 10.0, since: float | None = None) -> list[str]:
    """Remove the python backend's shared memory regions that no process maps any more: what a
    server that died abruptly left, including regions of stubs it started so shortly before that no
    scan saw them. Only regions of this user that no process whose maps can be read maps, and either
    older than ``min_age`` seconds (a starting server creates and maps its own in one step) or made
    at or after ``since`` (the launch of a server that is gone now: a SIGTERM that arrives while
    tritonserver still loads its models kills it before it can remove the regions it made)."""
    now, uid = time.time(), os.getuid()
    candidates = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.name.startswith(REGION_PREFIX):
                with contextlib.suppress(OSError):
                    info = entry.stat()
                    if info.st_uid == uid and (now - info.st_mtime >= min_age
                                               or (since is not None and info.st_ctime >= since)):
                        candidates[entry.path] = entry.name
    if not candidates:
        return []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                maps = f.read()
        except OSError:
            continue  # gone, or another user's (who could not map this user's 0600 region anyway)
        for path in [p for p in candidates if p in maps]:
            del candidates[path]
    removed = []
    for path, name in candidates.items():
        with contextlib.suppress(OSError):
            os.unlink(path)
            removed.append(name)
    return removed


@dataclass
class Heal:
    """One recovery, for the log and for tests: what died, what was done, how long it took."""

    model: str
    instances: list[str]
    detected: float
    action: str = ""   # "reload" (all instances dead), "reload-in-place", "server-restart", "failed"
    serving_after: float | None = None   # seconds from detection until the model was READY again
    error: str | None = None
    attempts: int = 0
