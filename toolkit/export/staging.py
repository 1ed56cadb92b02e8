"""Write a Triton version folder (``<out>/<version>/``) all at once or not at all.

Triton polls model repositories: a half-written ``1/`` (``model.onnx`` but no ``vocab.txt``, or a
truncated ``model.onnx``) could be loaded, and a failed export must not leave one behind. Files are
written into a hidden sibling folder and renamed into place in one ``os.replace`` at the end.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from toolkit.errors import ExportError
from toolkit.files import replace_dir, staging_dir


def check_version_target(out_dir: Path, version: int, overwrite: bool) -> Path:
    """Fail before any slow work if the target version folder cannot be written."""
    if version < 1:
        raise ExportError(f"version must be a positive integer (Triton version folders), got {version}")
    target = Path(out_dir) / str(version)
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; choose another --version or pass --overwrite")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ExportError(f"--out {out_dir} exists and is not a folder")
    return target


@contextmanager
def staged_version_dir(out_dir: Path, version: int, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder; on success it becomes ``<out_dir>/<version>``.

    On any exception the staging folder is removed and an existing version folder is untouched.
    """
    target = check_version_target(out_dir, version, overwrite)
    try:
        staging = staging_dir(target)
    except OSError as e:
        raise ExportError(f"cannot create {target.parent}: {e}") from e
    try:
        yield staging
        _promote(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _promote(staging: Path, target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:  # appeared while we were exporting
        raise ExportError(f"{target} appeared during the export; not replacing it")
    try:
        replace_dir(staging, target)
    except OSError as e:
        raise ExportError(f"cannot move the exported files into {target}: {e}") from e


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
