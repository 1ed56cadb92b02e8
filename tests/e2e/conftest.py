"""A real tritonserver (the one bundled in nvidia-pytriton) serving the test project, once per session."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from onnx_models import write_linear_onnx
from serving import free_ports

from toolkit.project import load_project
from toolkit.repo import generate_repository
from toolkit.server import TritonServer

PROJECT = Path(__file__).parent / "project"
ROOT = Path(__file__).parents[2]


def build_project(root: Path) -> Path:
    """Copy the test project and build its ONNX model; returns the generated repository."""
    shutil.copytree(PROJECT, root / "project")
    write_linear_onnx(root / "project" / "models" / "linear" / "1" / "model.onnx")
    project = load_project(root / "project" / "models", root / "project" / "ensembles")
    return generate_repository(project, root / "repository").path


@dataclass
class Running:
    server: TritonServer
    repository: Path

    def url(self, protocol: str) -> str:
        return self.server.http_url if protocol == "http" else self.server.grpc_url


@pytest.fixture(scope="session")
def triton(tmp_path_factory) -> Running:
    root = tmp_path_factory.mktemp("triton")
    repository = build_project(root)
    http, grpc, metrics = free_ports(3)
    server = TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                          log_file=root / "tritonserver.log")
    with server:
        yield Running(server, repository)


@pytest.fixture(scope="session")
def example_server(tmp_path_factory, minilm_export, mobilenet_export) -> TritonServer:
    """The project's own `model_repository/` + `ensembles/` (embedding, mobile) on a real tritonserver,
    with freshly exported ONNX files in place of any local exports."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(ROOT / "model_repository", root / "models", ignore=shutil.ignore_patterns("[0-9]*"))
    shutil.copytree(ROOT / "ensembles", root / "ensembles")
    shutil.copytree(minilm_export, root / "models" / "bert" / "1")
    shutil.copytree(mobilenet_export, root / "models" / "mobilenet" / "1")
    repository = generate_repository(load_project(root / "models", root / "ensembles"), root / "repo").path
    http, grpc, metrics = free_ports(3)
    with TritonServer(repository, http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log_file=root / "tritonserver.log") as server:
        yield server
