"""One venv per peer server, made from its pinned requirements file; runs in the project's venv.

    from toolkit.bench.peer_envs import ensure_venv
    python = ensure_venv("mosec")          # build/peers/mosec/venv/bin/python

``ensure_venv`` is idempotent: it does nothing when the venv exists and its stamp file holds the
hash of the requirements file (and of this interpreter's version); otherwise it makes the venv
afresh: ``python -m venv``, then ``pip install`` of the ``torch==`` line alone first when there is
one (pip then takes the CPU wheel on this machine's disk, and nothing later pulls a CUDA build),
then the whole file. A venv that holds any ``nvidia-*`` package is refused. The project's own pins
(pyproject.toml) are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from toolkit.errors import PeerError

#: The peers' server scripts and their pinned requirements files.
SERVERS = Path(__file__).resolve().parent / "servers"
ROOT = Path(__file__).resolve().parents[2]
STAMP = ".toolkit-peer-stamp.json"


def requirements_file(name: str) -> Path:
    path = SERVERS / f"requirements-{name}.txt"
    if not path.is_file():
        raise PeerError(f"{name}: no requirements file {path.name}")
    return path


def requirements_hash(requirements: Path) -> str:
    """What the venv is made from: the file's requirement lines (comments and blanks ignored) and
    the interpreter's major.minor version."""
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    text = "\n".join(line for line in lines if line) + f"\npython {platform.python_version_tuple()[:2]}"
    return hashlib.sha256(text.encode()).hexdigest()


def peers_dir() -> Path:
    return Path(os.environ.get("TOOLKIT_PEERS_DIR", ROOT / "build" / "peers"))


def venv_dir(name: str) -> Path:
    return peers_dir() / name / "venv"


def read_stamp(venv: Path) -> dict:
    try:
        return json.loads((venv / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def is_current(venv: Path, requirements: Path) -> bool:
    """The venv exists, has its interpreter, and was made from exactly these requirements."""
    return ((venv / "bin" / "python").is_file()
            and read_stamp(venv).get("sha256") == requirements_hash(requirements))


def _pip(python: Path, args: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ pip {' '.join(args)}\n".encode())
        out.flush()
        result = subprocess.run([str(python), "-m", "pip", *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise PeerError(f"pip {' '.join(args[:3])}... failed with code {result.returncode}: {tail[0][:200]} "
                        f"(log: {log})")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def ensure_venv(name: str) -> Path:
    """The peer's venv interpreter, made (or remade) when missing or stale. Raises PeerError."""
    requirements = requirements_file(name)
    venv = venv_dir(name)
    python = venv / "bin" / "python"
    if is_current(venv, requirements):
        return python
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    log = venv.parent / "install.log"
    log.write_text(f"{name}: venv from {requirements}\n")
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PeerError(f"{name}: python -m venv failed: {result.stderr.strip()[-200:]}")
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    torch = [line for line in lines if line.startswith("torch==")]
    if torch:
        _pip(python, ["install", "--no-input", *torch], log)
    _pip(python, ["install", "--no-input", "-r", str(requirements)], log)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                            check=False)
    packages = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout or "[]")}
    cuda = sorted(p for p in packages if p.startswith("nvidia-"))
    if cuda:
        raise PeerError(f"{name}: the venv pulled CUDA packages {cuda[:3]}: refusing it (install torch first)")
    stamp = {"sha256": requirements_hash(requirements), "requirements": requirements.name,
             "install_s": round(time.monotonic() - start, 1), "size_bytes": du(venv), "packages": packages}
    (venv / STAMP).write_text(json.dumps(stamp, indent=1))
    return python
