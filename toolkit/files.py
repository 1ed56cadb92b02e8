"""Replace a folder all at once or not at all: a generated repository, an exported version folder.

Triton polls repositories and users read them, so a half-written folder must never appear: the new
content is built in a hidden sibling and renamed into place; if that last rename fails, the old
folder is put back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_dir(target: Path) -> Path:
    """An empty hidden sibling of ``target``, readable as the umask allows (mkdtemp makes 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
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
