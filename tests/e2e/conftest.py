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
