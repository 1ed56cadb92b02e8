"""Occupancy (toolkit/runtime/occupancy.py): which instances of a model are executing, seen across
their processes, and the ONNX hook's ``intra_op_threads: adaptive`` that reads it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from bounded import read_until

from toolkit.hooks import HookContext
from toolkit.runtime import occupancy
from toolkit.runtime.occupancy import Occupancy, instance_slot

#: A peer instance in a process of its own: marks its slot busy until told to stop ("x\n").
PEER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from toolkit.runtime.occupancy import Occupancy
    peer = Occupancy(Path(sys.argv[1]), slot=int(sys.argv[2]), count=2)
    with peer.busy():
        print("busy", flush=True)
        sys.stdin.readline()
    print("idle", flush=True)
    sys.stdin.readline()
""")


@pytest.fixture(scope="module")
def dense_onnx(tmp_path_factory):
    """MatMul, Relu, MatMul, ReduceMean: kernels onnxruntime splits across threads."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = tmp_path_factory.mktemp("dense")
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("w1", (256, 512)), ("w2", (512, 64)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["o"]),
         helper.make_node("ReduceMean", ["o"], ["y"], axes=[1], keepdims=0)], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    return folder


def _adaptive(folder, occupancy: Occupancy, **params):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("dense", 1, folder, parameters=params, instance_count=occupancy.count,
                          occupancy=occupancy))
    return hook


@pytest.fixture
def peer(tmp_path):
    procs = []

    def start(slot: int = 1) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", PEER, str(tmp_path / "m.lock"), str(slot)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert read_until(proc, "\n", 30) == ["busy\n"]
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(timeout=30)


def test_a_busy_peer_is_seen_until_it_ends_its_batch(tmp_path, peer):
    me = Occupancy(tmp_path / "m.lock", slot=0, count=2)
    assert me.shared and not me.others_busy()
    proc = peer()
    assert me.others_busy()
    with me.busy():  # my own batch neither waits for the peer nor hides it
        assert me.others_busy()
    proc.stdin.write("x\n")
    proc.stdin.flush()
    assert read_until(proc, "\n", 30) == ["idle\n"]
    assert not me.others_busy()


def test_a_peer_killed_mid_batch_does_not_look_busy_for_ever(tmp_path, peer):
    me = Occupancy(tmp_path / "m.lock", slot=0, count=2)
    proc = peer()
    assert me.others_busy()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not me.others_busy()


def test_a_slot_held_by_another_process_never_blocks_a_batch(tmp_path, peer):
    """A reload's new instance may reuse a draining one's name, hence its slot: run unmarked."""
    peer(slot=0)
    me = Occupancy(tmp_path / "m.lock", slot=0, count=2)
    with me.busy():
        pass
    assert not me.others_busy()  # slot 0 is mine to skip; slot 1 is free


def test_one_instance_or_an_unknown_slot_is_the_null_occupancy(tmp_path):
    alone = Occupancy()
    with alone.busy():
        assert not alone.others_busy()
    assert not alone.shared
    groups = [{"name": "m_0", "count": 1}]
    assert not occupancy.for_instance("m", 1, "m_0_0", groups).shared
    assert not occupancy.for_instance("m", 1, "other_0", [{"name": "m_0", "count": 2}]).shared


def test_slots_follow_tritons_instance_names_across_groups():
    groups = [{"name": "bert_0", "count": 2}, {"name": "bert_1", "count": 3}]
    assert instance_slot("bert_0_0", groups) == (0, 5)
    assert instance_slot("bert_0_1", groups) == (1, 5)
    assert instance_slot("bert_1_2", groups) == (4, 5)
    assert instance_slot("bert_1_3", groups) is None
    assert instance_slot("", groups) is None


def test_lock_files_of_gone_servers_are_removed_and_live_ones_kept(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)
    dead = tmp_path / f"{occupancy.PREFIX}{gone.pid}-bert-v1.lock"
    live = tmp_path / f"{occupancy.PREFIX}{os.getpid()}-bert-v1.lock"
    other = tmp_path / "unrelated.lock"
    for path in (dead, live, other):
        path.touch()
    occupancy.remove_stale(tmp_path)
    assert not dead.exists() and live.exists() and other.exists()
    occupancy.remove_server_files(os.getpid(), tmp_path)
    assert not live.exists() and other.exists()


class _Recorder:
    def __init__(self, name: str, calls: list[str]):
        self.name, self.calls = name, calls

    def run(self, names, feed):
        self.calls.append(self.name)
        return [feed["x"][:, 0, :64]]


def test_adaptive_threads_use_every_core_only_while_no_peer_is_busy(dense_onnx, tmp_path, peer):
    from toolkit.runtime.onnx_hook import default_threads

    if default_threads(1) < 2:
        pytest.skip("one core: adaptive threads have nothing to add")
    hook = _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2), intra_op_threads="adaptive")
    assert hook.session.get_session_options().intra_op_num_threads == default_threads(2)
    assert hook.solo.get_session_options().intra_op_num_threads == default_threads(1)
    calls: list[str] = []
    hook.session, hook.solo = _Recorder("share", calls), _Recorder("solo", calls)
    batch = {"x": np.ones((1, 4, 256), np.float32)}
    hook.infer(batch)
    proc = peer()
    hook.infer(batch)
    proc.stdin.write("x\n")
    proc.stdin.flush()
    assert read_until(proc, "\n", 30) == ["idle\n"]
    hook.infer(batch)
    assert calls == ["solo", "share", "solo"]


def test_adaptive_is_the_default_and_one_instance_keeps_one_session(dense_onnx, tmp_path):
    from toolkit.runtime.onnx_hook import default_threads

    assert _adaptive(dense_onnx, Occupancy()).solo is None
    fixed = _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2), intra_op_threads="1")
    assert fixed.solo is None and fixed.session.get_session_options().intra_op_num_threads == 1
    if default_threads(1) >= 2:
        assert _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2)).solo is not None


def _spin_entries(session) -> tuple[str, str]:
    options = session.get_session_options()

    def entry(key: str) -> str:  # "" where unset: onnxruntime's default
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:
            return ""

    return entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")


def test_by_default_only_the_every_core_session_spins_and_only_within_a_run(dense_onnx, tmp_path):
    """``spin_threads: solo``: a run no peer overlaps spins between its ops and stops at its end; the
    sessions that share the cores with a peer never spin; an explicit ``false`` keeps both asleep."""
    from toolkit.runtime.onnx_hook import default_threads

    if default_threads(1) < 2:
        pytest.skip("one core: adaptive threads have nothing to add")
    hook = _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2))
    assert _spin_entries(hook.session) == ("0", "") and _spin_entries(hook.solo) == ("", "1")
    asleep = _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2), spin_threads="false")
    assert _spin_entries(asleep.session) == _spin_entries(asleep.solo) == ("0", "")
    assert _spin_entries(_adaptive(dense_onnx, Occupancy()).session) == ("0", "")  # one instance: no solo


@pytest.mark.parametrize(("key", "value"), [("intra_op_threads", "two"), ("intra_op_threads", "0"),
                                            ("spin_threads", "sometimes")])
def test_bad_thread_parameters_are_refused_by_name(dense_onnx, key, value):
    with pytest.raises(ValueError, match=key):
        _adaptive(dense_onnx, Occupancy(), **{key: value})


def test_both_sessions_of_adaptive_threads_give_the_same_bits(dense_onnx, tmp_path):
    """The thread count changes the speed of a run, never its answer (onnxruntime splits a kernel's
    outputs, not its sums, across threads), so load cannot change a served vector."""
    from toolkit.runtime.onnx_hook import default_threads

    if default_threads(1) < 2:
        pytest.skip("one core: adaptive threads have nothing to add")
    hook = _adaptive(dense_onnx, Occupancy(tmp_path / "m.lock", slot=0, count=2))
    feed = {"x": np.random.default_rng(1).standard_normal((8, 40, 256)).astype(np.float32)}
    share, solo = (s.run(hook.output_names, feed)[0] for s in (hook.session, hook.solo))
    assert np.array_equal(share, solo)
