"""Which instances of one model are executing a batch right now, seen from any of them.

Triton runs each instance of a python model in a stub process of its own. A hook that sizes a thread
pool per run (``intra_op_threads: adaptive`` in the ONNX hook) needs to know whether it runs alone:
then it may use every core, otherwise only its share. The instances of one model in one server share
a lock file; while an instance executes a batch it holds an exclusive POSIX record lock on its own
byte (its slot), and a peek at the other slots tells who else is busy. The kernel drops a process's
locks when it dies, so a crashed stub never looks busy for ever. Costs: two ``fcntl`` calls per batch
and two per peer per peek, microseconds.

The file is ``<tmp>/toolkit-occupancy-<tritonserver pid>-<model>-v<version>.lock`` (empty: record locks need no
bytes). ``TritonServer.stop`` removes its server's files; files of servers that are gone (a container,
a killed server) are removed by the next instance that starts on the machine.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

PREFIX = "toolkit-occupancy-"
_FILE = re.compile(re.escape(PREFIX) + r"(\d+)-.+\.lock\Z")


def lock_directory() -> Path:
    return Path(tempfile.gettempdir())


def lock_file(server_pid: int, model: str, version: int | str) -> Path:
    return lock_directory() / f"{PREFIX}{server_pid}-{model}-v{version}.lock"


class Occupancy:
    """This instance's slot among ``count`` instances. ``Occupancy()`` alone is the null object: one
    instance (or an unknown slot) that never sees a busy peer and marks nothing."""

    def __init__(self, path: Path | None = None, slot: int = 0, count: int = 1):
        self.slot, self.count = slot, count
        self._fd = None
        if path is not None and count > 1:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @property
    def shared(self) -> bool:
        """Whether there are peers to see (more than one instance, slot known)."""
        return self._fd is not None

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Mark this instance as executing for the ``with`` block."""
        if self._fd is None:
            yield
            return
        try:
            # Never wait: a peer's peek holds the byte for a microsecond, and a slot held by another
            # process (an old instance still draining while a reload starts its successor) must not
            # serialize the two. Unmarked, this batch only looks idle to the peers.
            fcntl.lockf(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, self.slot)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, self.slot)

    def others_busy(self) -> bool:
        """Whether any other instance is executing a batch right now."""
        if self._fd is None:
            return False
        for slot in range(self.count):
            if slot == self.slot:
                continue
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, slot)
            except OSError:  # held exclusively: that instance is executing
                return True
            fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, slot)
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def instance_slot(instance_name: str, groups: Sequence[Mapping[str, Any]]) -> tuple[int, int] | None:
    """(slot, count) of ``instance_name`` among the config's instance groups, whose instances Triton
    names ``<group name>_<i>``; None if the name is not one of them."""
    offset = 0
    for group in groups:
        count = int(group.get("count", 1))
        name = group.get("name", "")
        for i in range(count):
            if instance_name == f"{name}_{i}":
                return offset + i, sum(int(g.get("count", 1)) for g in groups)
        offset += count
    return None


def for_instance(model: str, version: int | str, instance_name: str,
                 groups: Sequence[Mapping[str, Any]]) -> Occupancy:
    """The occupancy of one stub's instance: its server is the stub's parent process."""
    found = instance_slot(instance_name, groups)
    if found is None or found[1] < 2:
        return Occupancy()
    remove_stale()
    return Occupancy(lock_file(os.getppid(), model, version), *found)


def remove_stale(directory: Path | None = None) -> None:
    """Remove the lock files of servers that are no longer running."""
    if not Path("/proc/self").exists():  # no way to tell a live server from a gone one
        return
    directory = directory or lock_directory()
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            match = _FILE.match(entry.name)
            if match and not Path(f"/proc/{match.group(1)}").exists():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def remove_server_files(server_pid: int, directory: Path | None = None) -> None:
    """Remove one (stopped) server's lock files."""
    for path in (directory or lock_directory()).glob(f"{PREFIX}{server_pid}-*.lock"):
        with contextlib.suppress(OSError):
            path.unlink()
