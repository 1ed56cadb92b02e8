"""The peer servers' launcher, without any peer venv: loopback check, venv stamp, vector check."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from toolkit.bench import peer_envs as envs
from toolkit.bench import peers
from toolkit.errors import ToolkitError

ME = os.getpid()

# `ss -H -ltnp` / `ss -H -tnp` as this machine prints them (Ray's C++ servers bind v4-mapped addresses).
LISTEN_LOOPBACK = f"""\
LISTEN 0      2048          127.0.0.1:9411       0.0.0.0:* users:(("ray::ProxyActor",pid={ME},fd=50))
LISTEN 0      4096 [::ffff:127.0.0.1]:9430             *:* users:(("gcs_server",pid={ME},fd=44))
LISTEN 0      4096              [::1]:9431          [::]:* users:(("raylet",pid={ME},fd=40))
LISTEN 0      128             0.0.0.0:2024       0.0.0.0:* users:(("someone-else",pid=1,fd=3))
"""
LISTEN_ALL_INTERFACES = f"""\
LISTEN 0      2048          127.0.0.1:9411       0.0.0.0:* users:(("ray::ProxyActor",pid={ME},fd=50))
LISTEN 0      4096            0.0.0.0:44023      0.0.0.0:* users:(("ray::ServeRepli",pid={ME},fd=62))
"""
LISTEN_WILDCARD = f"""\
LISTEN 0      4096                  *:44023            *:* users:(("ray::ServeRepli",pid={ME},fd=62))
"""
ESTABLISHED_LOOPBACK = f"""\
ESTAB 0      0      [::ffff:127.0.0.1]:53154 [::ffff:127.0.0.1]:9430 users:(("ray::ServeRepli",pid={ME},fd=11))
ESTAB 0      0               127.0.0.1:9411          127.0.0.1:50000 users:(("ray::ProxyActor",pid={ME},fd=9))
"""
ESTABLISHED_OUT = f"""\
ESTAB 0      0      [::ffff:192.0.2.2]:54414 [::ffff:192.0.2.2]:43855 users:(("raylet",pid={ME},fd=63))
"""


def fake_ss(listening: str, connected: str = "", udp: str = ""):
    outputs = {"-ltnp": listening, "-tnp": connected, "-uanp": udp}
    return lambda args: outputs[args[0]]


# ----------------------------------------------------------------------------- loopback
def test_ss_parser_reads_addresses_and_pids_with_or_without_netid():
    rows = peers.parse_ss(LISTEN_LOOPBACK + f'tcp LISTEN 0 5 127.0.0.1:9435 0.0.0.0:* users:(("a",pid={ME},fd=1))\n')
    assert rows[1] == ("LISTEN", "[::ffff:127.0.0.1]:9430", "*:*", {ME})
    assert rows[3][3] == {1}
    assert rows[4] == ("LISTEN", "127.0.0.1:9435", "0.0.0.0:*", {ME})


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("*", False), ("192.0.2.2", False), ("::ffff:192.0.2.2", False),
    ("10.0.0.1", False), ("localhost", False),
])
def test_is_loopback(host, loopback):
    assert peers.is_loopback(host) is loopback


def test_all_loopback_passes_and_reports_the_evidence():
    evidence = peers.check_loopback("ray", ME, run=fake_ss(LISTEN_LOOPBACK, ESTABLISHED_LOOPBACK))
    # someone else's 0.0.0.0 listener (pid 1) is not the peer's: it neither fails nor shows up
    assert evidence["listening"] == ["127.0.0.1:9411", "[::1]:9431", "[::ffff:127.0.0.1]:9430"]
    assert evidence["connections"] == 2


@pytest.mark.parametrize("listening, connected, culprit", [
    (LISTEN_ALL_INTERFACES, "", "0.0.0.0:44023"),
    (LISTEN_WILDCARD, "", "*:44023"),
    (LISTEN_LOOPBACK, ESTABLISHED_OUT, "192.0.2.2"),
])
def test_a_socket_off_loopback_is_refused(listening, connected, culprit):
    with pytest.raises(peers.PeerError, match="ray: not loopback only") as caught:
        peers.check_loopback("ray", ME, run=fake_ss(listening, connected))
    assert culprit in str(caught.value)
    assert isinstance(caught.value, ToolkitError)


def test_an_unconnected_udp_socket_off_loopback_is_refused():
    udp = f'UNCONN 0 0 0.0.0.0:5353 0.0.0.0:* users:(("mdns",pid={ME},fd=5))\n'
    with pytest.raises(peers.PeerError, match=r"0\.0\.0\.0:5353"):
        peers.check_loopback("mosec", ME, run=fake_ss(LISTEN_LOOPBACK, "", udp))


def test_process_tree_holds_this_process():
    assert ME in peers.process_tree(ME)


# ----------------------------------------------------------------------------- venv stamp
def test_requirements_hash_ignores_comments_but_not_pins(tmp_path):
    a, b, c = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text("mosec==0.9.8\nnumpy==1.26.4\n")
    b.write_text("# a comment\nmosec==0.9.8   # why\n\nnumpy==1.26.4\n")
    c.write_text("mosec==0.9.7\nnumpy==1.26.4\n")
    assert envs.requirements_hash(a) == envs.requirements_hash(b)
    assert envs.requirements_hash(a) != envs.requirements_hash(c)


def test_stamp_decides_whether_the_venv_is_remade(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements-x.txt"
    requirements.write_text("mosec==0.9.8\n")
    venv = tmp_path / "venv"
    assert not envs.is_current(venv, requirements)  # no venv
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    assert not envs.is_current(venv, requirements)  # no stamp
    (venv / envs.STAMP).write_text(json.dumps({"sha256": envs.requirements_hash(requirements)}))
    assert envs.is_current(venv, requirements)
    requirements.write_text("mosec==0.9.9\n")  # a pin changed: stale
    assert not envs.is_current(venv, requirements)


def test_ensure_venv_skips_a_current_venv_without_running_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_PEERS_DIR", str(tmp_path))
    venv = envs.venv_dir("mosec")
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")
    (venv / envs.STAMP).write_text(json.dumps({"sha256": envs.requirements_hash(envs.requirements_file("mosec"))}))
    monkeypatch.setattr(envs.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    assert envs.ensure_venv("mosec") == venv / "bin" / "python"


def test_every_peer_pins_exact_versions():
    for name in peers.PEERS:
        lines = [line.split("#", 1)[0].strip() for line in envs.requirements_file(name).read_text().splitlines()]
        pins = [line for line in lines if line]
        assert pins and all("==" in line for line in pins), name
    infinity = envs.requirements_file("infinity").read_text()
    assert "torch==2.13.0" in infinity


def test_an_unknown_peer_has_no_requirements():
    with pytest.raises(peers.PeerError, match="no requirements file"):
        envs.requirements_file("triton-but-faster")


# ----------------------------------------------------------------------------- vector check
def test_matching_vectors_pass_and_return_the_smallest_cosine():
    rng = np.random.default_rng(0)
    ours = rng.normal(size=(5, 384))
    theirs = ours + rng.normal(scale=1e-4, size=ours.shape)
    worst = peers.check_vectors("mosec", ours, theirs)
    assert 0.999 <= worst < 1.0


def test_a_bad_cosine_names_the_peer_and_the_value():
    rng = np.random.default_rng(1)
    ours = rng.normal(size=(4, 384))
    theirs = ours.copy()
    theirs[2] = rng.normal(size=384)  # one row from another model
    with pytest.raises(peers.PeerError, match=r"infinity: vectors differ from ours: min cosine -?0\.\d+ < 0.999"):
        peers.check_vectors("infinity", ours, theirs)


def test_nan_or_a_wrong_shape_fails_the_vector_check():
    ours = np.ones((2, 3))
    with pytest.raises(peers.PeerError, match="min cosine nan"):
        peers.check_vectors("ray", ours, np.array([[1.0, 1.0, 1.0], [np.nan, 0, 0]]))
    with pytest.raises(peers.PeerError, match="shape"):
        peers.check_vectors("ray", ours, np.ones((1, 3)))


# ----------------------------------------------------------------------------- wiring
def test_the_cli_runs_every_peer_and_every_toolkit_form_by_default():
    from toolkit.bench.runner import KNOWN_CONTENDERS, TOOLKIT_FORMS
    from toolkit.cli.bench import DEFAULT_CONTENDERS

    assert set(peers.PEERS) <= set(DEFAULT_CONTENDERS) <= set(KNOWN_CONTENDERS)
    assert {"inprocess", "naive", "pytriton", *TOOLKIT_FORMS} <= set(DEFAULT_CONTENDERS)


def test_infinity_is_refused_for_images_before_anything_is_installed(tmp_path, monkeypatch):
    from pathlib import Path

    from toolkit.bench.workloads import workload

    monkeypatch.setattr(peers, "ensure_venv", lambda name: pytest.fail("installed"))
    with pytest.raises(peers.PeerError, match="infinity: n/a for mobile"), \
            peers.serve_peer("infinity", workload("mobile", Path("unused")), tmp_path):
        pass


def test_free_block_stays_in_the_configured_range(monkeypatch):
    monkeypatch.setenv("TOOLKIT_PEER_PORTS", "9400-9499")
    block = peers.free_block(3)
    assert len(block) == 3 and all(9400 <= p <= 9499 for p in block)
    assert block == list(range(block[0], block[0] + 3))
    monkeypatch.setenv("TOOLKIT_PEER_PORTS", "9400-9401")
    with pytest.raises(peers.PeerError, match="no 3 consecutive free ports"):
        peers.free_block(3)
