"""A newcomer's set-up output (issue 21): `./dev.sh`'s `==>` lines carry colour escapes only on a
terminal that shows them, pip's upgrade notice is off, setuptools' editable-install box is gone, and
the `.venv` size is one figure. dev.sh runs as typed, with a stand-in venv whose pip records its calls
(nothing is installed)."""

from __future__ import annotations

import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture
def fake_venv(tmp_path) -> Path:
    """A venv dev.sh takes as made: bin/python exists, bin/pip logs its arguments and environment."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    pip = venv / "bin" / "pip"
    pip.write_text('#!/bin/sh\necho "pip $* PYTHONWARNINGS=${PYTHONWARNINGS:-} '
                   'PIP_DISABLE_PIP_VERSION_CHECK=${PIP_DISABLE_PIP_VERSION_CHECK:-}" '
                   f'>> {tmp_path / "pip.log"}\n')
    pip.chmod(0o755)
    return venv


def dev_sh_setup(venv: Path, *, tty: bool, **env: str) -> str:
    """`./dev.sh setup` with stderr a pipe or a terminal; returns what it wrote there."""
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("NO_COLOR", "TERM", "PIP_DISABLE_PIP_VERSION_CHECK")}
    environment.update({"VENV": str(venv), "TERM": "xterm-256color", **env})
    if not tty:
        done = subprocess.run(["./dev.sh", "setup"], cwd=ROOT, env=environment, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stderr
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(["./dev.sh", "setup"], cwd=ROOT, env=environment, stdout=subprocess.DEVNULL,
                                   stderr=terminal)
        os.close(terminal)
        chunks = []
        deadline = time.monotonic() + 60
        while (left := deadline - time.monotonic()) > 0:   # a set-up that stops talking is not waited on
            if not select.select([controller], [], [], left)[0]:
                continue
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        try:
            assert process.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, b"".join(chunks)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
    finally:
        os.close(controller)
    return b"".join(chunks).decode()


def test_dev_sh_lines_are_plain_text_when_stderr_is_not_a_terminal(fake_venv):
    stderr = dev_sh_setup(fake_venv, tty=False)
    assert "==> installing Python packages into" in stderr, stderr
    assert "\x1b" not in stderr, repr(stderr)


@pytest.mark.parametrize(("env", "coloured"), [({}, True), ({"TERM": "dumb"}, False), ({"NO_COLOR": "1"}, False)])
def test_dev_sh_colours_only_a_terminal_that_is_not_dumb_without_no_color(fake_venv, env, coloured):
    stderr = dev_sh_setup(fake_venv, tty=True, **env)
    assert "==> installing Python packages into" in stderr, stderr
    assert ("\x1b[1m==> installing" in stderr) == coloured, repr(stderr)
    assert ("\x1b" in stderr) == coloured, repr(stderr)


def test_dev_sh_turns_off_pips_upgrade_notice(fake_venv, tmp_path):
    dev_sh_setup(fake_venv, tty=False)
    calls = (tmp_path / "pip.log").read_text().splitlines()
    assert calls and all(call.endswith("PIP_DISABLE_PIP_VERSION_CHECK=1") for call in calls), calls


def test_editable_install_prints_no_setuptools_box_and_installs_only_toolkit(fake_venv, tmp_path):
    """dev.sh's editable install, as pip runs it: setuptools' build_editable on the project, with the
    environment dev.sh gives pip. No box, and only ``toolkit`` is importable from the install: the
    project's other folders (export/, clients/, tests/) stay out of the import namespace."""
    dev_sh_setup(fake_venv, tty=False)
    editable = next(c for c in (tmp_path / "pip.log").read_text().splitlines() if " -e " in c)
    warnings = re.search(r"PYTHONWARNINGS=(.*) PIP_DISABLE", editable).group(1)
    assert warnings, editable
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "toolkit", project / "toolkit", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "export").mkdir()
    (project / "out").mkdir()
    env = {**os.environ, "PYTHONWARNINGS": warnings}
    done = subprocess.run([sys.executable, "-c", "import setuptools.build_meta as b; print(b.build_editable('out'))"],
                          cwd=project, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "Please be careful with folders" not in output and "!!" not in output, output
    wheel = next((project / "out").glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        pth = [archive.read(n).decode() for n in archive.namelist() if n.endswith(".pth")]
    assert pth and all(str(project) not in text.splitlines() for text in pth), pth  # no plain path to the root


def test_the_venv_size_is_one_figure_in_dev_sh_and_the_readme():
    def sizes(text: str) -> set[str]:
        return set(re.findall(r"(?:about|~) ?\**(\d+(?:\.\d+)?) GB\**", text))

    readme = (ROOT / "README.md").read_text()
    venv_line = next(line for line in readme.splitlines() if "the `.venv` takes" in line)
    dev_line = next(line for line in (ROOT / "dev.sh").read_text().splitlines() if "installing Python packages" in line)
    assert sizes(venv_line) == sizes(dev_line) == {"2.5"}, (venv_line, dev_line)


STUB_TOOLKIT = """#!/bin/sh
echo "toolkit $*" >> "$(dirname "$0")/../calls.log"
if [ "$1" = serve ]; then
    echo "Triton is ready (a stand-in)"; echo "Press Ctrl-C to stop."
    trap 'exit 0' TERM
    while :; do sleep 0.1; done
fi
"""


def test_demo_hints_name_the_ports_port_base_chose(fake_venv, tmp_path):
    """The demo as typed with PORT_BASE, on a copy of dev.sh whose venv holds stand-ins for toolkit and
    the clients: its closing hints and the server it starts use PORT_BASE's ports, not 8000/8001."""
    from serving import free_port_run

    base = free_port_run(3)
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in ("dev.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, clone / name)
    for name, text in (("toolkit", STUB_TOOLKIT), ("python", "#!/bin/sh\necho \"client $*\"\n")):
        (fake_venv / "bin" / name).unlink(missing_ok=True)
        (fake_venv / "bin" / name).write_text(text)
        (fake_venv / "bin" / name).chmod(0o755)
    environment = {**os.environ, "VENV": str(fake_venv), "PORT_BASE": str(base)}
    done = subprocess.run(["./dev.sh", "demo"], cwd=clone, env=environment, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    http, grpc, metrics = base, base + 1, base + 2
    assert (f"toolkit serve --repository build/model_repository --http-port {http} --grpc-port {grpc} "
            f"--metrics-port {metrics}") in (fake_venv / "calls.log").read_text()
    assert f"toolkit serve --http-port {http} --grpc-port {grpc} --metrics-port {metrics}" in done.stderr
    assert f"on {http}/{grpc}" in done.stderr
    assert f"toolkit infer embedding -i 'TEXT=[\"hello\",\"world\"]' --url 127.0.0.1:{http}" in done.stderr
    assert not re.search(r"\b800[01]\b", done.stderr), done.stderr
