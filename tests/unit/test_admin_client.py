"""The one admin client (toolkit/client/admin.py) when Triton cannot answer: a refused connection and
a listener that never answers both end within the call's timeout, as status 0 for a poller and as
one TritonAdminError naming the address for an operator. Its calls on a real tritonserver are
exercised by tests/e2e/test_rollout.py and tests/e2e/test_supervisor.py."""

from __future__ import annotations

import socket
import time

import pytest

from toolkit.client.admin import TritonAdmin
from toolkit.errors import ToolkitError, TritonAdminError
from toolkit.server import free_ports


def test_a_refused_connection_is_status_0_and_a_named_error():
    (port,) = free_ports(1)
    admin = TritonAdmin(f"http://127.0.0.1:{port}/")
    assert admin.url == f"127.0.0.1:{port}"
    assert admin.request("POST", "/v2/repository/index", {}) == (0, b"")
    assert admin.ready_models() == [] and not admin.live() and not admin.ready("bert")
    with pytest.raises(TritonAdminError, match=rf"could not load 'bert': Triton is not reachable at "
                                               rf"http://127.0.0.1:{port}") as info:
        admin.load("bert")
    assert info.value.status == 0 and isinstance(info.value, ToolkitError)


def test_a_server_that_never_answers_costs_one_timeout_not_more():
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        admin = TritonAdmin(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        started = time.monotonic()
        assert admin.request("GET", "/v2/health/ready") == (0, b"")
        with pytest.raises(TritonAdminError, match="did not answer in time"):
            admin.unload("bert", timeout=0.3)
        assert time.monotonic() - started < 5
