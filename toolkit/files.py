"""How a repository's files change: all at once or not at all, and one change at a time.

Triton polls repositories and users read them, so a half-written folder must never appear: the new
content is built in a hidden sibling and renamed into place; if that last rename fails, the old
folder is put back.

Every change to a served repository - a heal, a rollout, a rollback, a server's start - holds one
lock, a file beside the repository (``build/.model_repository.lock`` for ``build/model_repository``)
held with ``flock``: it excludes other processes and other threads of this one (each ``hold`` opens
the file anew), and the kernel releases it when its holder dies, so a killed rollout never leaves it
held. The holder writes who it is into the file, which is what a refused operator is told.

    with RepositoryLock(repository).hold("rollout of 'bert'", wait=0):
        ...  # nothing else changes the repository meanwhile

Whoever holds the lock may clean the leftovers of a change that died half-way (``clean_leftovers``):
nothing else can be writing them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from toolkit.errors import LifecycleError


def staging_dir(target: Path) -> Path:
    """An empty hidden sibling of ``target``, readable as the umask allows (mkdtemp makes 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL_MARK}", dir=target.parent))
    mask = os.umask(0)
    os.umask(mask)
    staging.chmod(0o777 & ~mask)
    return staging


def replace_dir(staging: Path, target: Path) -> None:
    """Move ``staging`` to ``target``, replacing it; raises OSError with the old folder restored."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except OSError:
        if old is not None and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


#: The marks of half-done work in a repository: a staging folder (files.staging_dir) and a
#: rollout's candidate model (lifecycle/rollout.py).
PARTIAL_MARK = ".partial-"
CANDIDATE_SUFFIX = "__candidate"


#: How a heal names itself as the lock's holder (``heal_purpose``): whoever waits may be patient.
HEAL = "heal of "


def heal_purpose(model: str) -> str:
    return f"{HEAL}'{model}'"


class RepositoryBusy(LifecycleError):
    """Another operation holds the repository's lock."""


class RepositoryLock:
    def __init__(self, repository: Path):
        repository = Path(repository).absolute()
        self.repository = repository
        self.path = repository.parent / f".{repository.name}.lock"

    @contextlib.contextmanager
    def hold(self, purpose: str, *, wait: float = 0.0, heal_wait: float = 0.0,
             poll: float = 0.05) -> Iterator[None]:
        """Hold the lock for ``purpose`` (words for whoever waits), waiting up to ``wait`` seconds,
        or up to ``heal_wait`` while the holder is a heal (``heal_purpose``: it takes seconds);
        ``RepositoryBusy`` naming the holder when it stays taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            started = time.monotonic()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    waited = time.monotonic() - started
                    if waited >= wait and (waited >= heal_wait or not self.holder().startswith(HEAL)):
                        raise RepositoryBusy(f"{self.repository} is being changed by {self.holder()}; "
                                             f"not starting the {purpose} (retry when it is done)") from None
                    time.sleep(poll)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "purpose": purpose, "since": time.time()}).encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> str:
        """Who holds the lock, in words (best effort: the holder may be writing it right now)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another operation"
        since = time.time() - float(info.get("since", time.time()))
        return f"{info.get('purpose', 'an operation')} (pid {info.get('pid', '?')}, for {since:.0f}s)"


def leftovers(repository: Path) -> list[Path]:
    """Half-done work in ``repository``: staging folders of writes that never finished (anywhere in a
    model folder) and rollout candidates. Only meaningful while holding the lock."""
    repository = Path(repository)
    if not repository.is_dir():
        return []
    found = []
    for entry in repository.iterdir():
        if entry.is_dir() and (PARTIAL_MARK in entry.name or entry.name.endswith(CANDIDATE_SUFFIX)):
            found.append(entry)
        elif entry.is_dir():
            found += [sub for sub in entry.iterdir() if sub.is_dir() and PARTIAL_MARK in sub.name]
    return sorted(found)


def clean_leftovers(repository: Path) -> list[Path]:
    """Remove ``leftovers``; returns what was removed. Call it holding the lock."""
    removed = []
    for path in leftovers(repository):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    return removed
