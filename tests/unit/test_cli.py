"""The CLI: every command documented, user mistakes become `Error: ...` (exit 1), no heavy imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from onnx_models import write_linear_onnx

from toolkit.cli.main import cli

E2E_PROJECT = Path(__file__).parent.parent / "e2e" / "project"


def all_commands(group: click.Group, prefix=()):
    for name, command in group.commands.items():
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from all_commands(command, (*prefix, name))


def test_every_command_has_help_text():
    for path, command in all_commands(cli):
        assert command.help, f"`toolkit {' '.join(path)}` has no help text"
        result = CliRunner().invoke(cli, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_cli_import_stays_light_so_help_is_instant():
    code = ("import sys, toolkit.cli.main; heavy = [m for m in ('tensorflow', 'tf2onnx', 'onnxruntime', "
            "'tritonclient', 'onnx') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    assert out.strip() == "[]"


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    shutil.copytree(E2E_PROJECT, tmp_path / "p")
    write_linear_onnx(tmp_path / "p" / "models" / "linear" / "1" / "model.onnx")
    monkeypatch.chdir(tmp_path / "p")
    return tmp_path / "p"


def test_gen_repo_writes_repository_and_lists_models(project):
    result = CliRunner().invoke(cli, ["gen-repo", "--models", "models", "--out", "out"])
    assert result.exit_code == 0, result.output
    assert "pipeline" in result.output and "ensemble" in result.output
    assert (project / "out" / "pipeline" / "config.pbtxt").is_file()


def test_gen_repo_check_validates_without_writing(project):
    result = CliRunner().invoke(cli, ["gen-repo", "--models", "models", "--out", "out", "--check",
                                      "--target", "container"])
    assert result.exit_code == 0, result.output
    assert "OK: 6 model(s), 1 ensemble(s) valid for target container" in result.output
    assert not (project / "out").exists()


def test_gen_repo_check_passes_when_an_ensemble_has_execution_fused(project):
    """--check runs gen-repo's own render loop, so a fused ensemble gen-repo writes also checks (it
    used to fail with "render it with toolkit.fused")."""
    spec = project / "ensembles" / "pipeline.yaml"
    spec.write_text(spec.read_text() + "\nexecution: fused\n")
    result = CliRunner().invoke(cli, ["gen-repo", "--models", "models", "--out", "out", "--check"])
    assert result.exit_code == 0, result.output
    assert "OK: 6 model(s), 1 ensemble(s) valid for target embedded" in result.output
    assert not (project / "out").exists()
    written = CliRunner().invoke(cli, ["gen-repo", "--models", "models", "--out", "out"])
    assert written.exit_code == 0, written.output
    assert (project / "out" / "pipeline" / "1" / "fused.json").is_file()


def test_gen_repo_reports_spec_error_without_traceback_and_writes_nothing(project):
    spec = project / "models" / "scale" / "model.yaml"
    spec.write_text(spec.read_text().replace("dtype: FP32, dims: [4]}", "dtype: FP32, dims: [four]}", 1))
    result = CliRunner().invoke(cli, ["gen-repo", "--models", "models", "--out", "out"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ")
    assert "models/scale/model.yaml: model 'scale': field 'inputs.0.dims.0'" in result.output
    assert "Traceback" not in result.output and not (project / "out").exists()


def test_infer_reports_unreachable_server_as_error(project):
    result = CliRunner().invoke(cli, ["infer", "scale", "-i", "X=[1,2,3,4]", "--url", "127.0.0.1:9", "--timeout", "2"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
