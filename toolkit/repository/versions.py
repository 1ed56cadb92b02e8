"""One model version folder as gen-repo writes it: the source version folder, the hook modules, the
assets and the adapter. Shared by gen-repo, the fused plan (each step's folder) and rollout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from toolkit.errors import RepositoryError
from toolkit.repository.project import ModelSource
from toolkit.repository.render import Target

#: The fixed python-backend adapter, copied verbatim as ``<version>/model.py``.
ADAPTER = Path(__file__).resolve().parents[1] / "runtime" / "adapter.py"


def write_versions(source: ModelSource, folder: Path, target: Target, versions: list[int] | None = None) -> None:
    """Write the model's version folders (all, or ``versions``) into ``folder``."""
    for version in versions or source.versions:
        write_version(source, version, folder / str(version), target)


def write_version(source: ModelSource, version: int, dst: Path, target: Target, *, adapter: bool = True) -> None:
    """One version folder at ``dst``: the source version folder, the model folder's hook modules (a
    version folder's own module of the same name wins: that is how a new version ships new hook
    code), the assets, and (``adapter``, where Triton runs it) the adapter."""
    spec = source.spec
    hook_files = sorted(source.folder.glob("*.py")) if spec.kind == "python" else []
    src = source.folder / str(version)
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link_or_copy)
    else:
        dst.mkdir()
    for path in [*hook_files, *sorted(dst.glob("*.py"))]:
        if path.name == "model.py":
            raise RepositoryError(f"{path}: 'model.py' is reserved for the toolkit's adapter; "
                                  "rename the hook module")
    for path in hook_files:
        if not (src / path.name).exists():
            link_or_copy(path, dst / path.name)
    for name, rel in sorted(spec.assets.items()):
        link_or_copy(source.folder / rel, dst / name)
    if adapter and (spec.kind == "python" or target == "embedded"):
        shutil.copyfile(ADAPTER, dst / "model.py")


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link large artifacts (an ONNX BERT is ~90 MB) when possible; copy otherwise."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        dst.unlink()
    if src.stat().st_size >= 1 << 20:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)
