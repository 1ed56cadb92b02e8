"""Ensemble DAG checks: each kind of miswiring has its clear message, and sound DAGs pass."""

from __future__ import annotations

import pytest
from projects import python_model, write_ensemble, write_model

from toolkit.errors import SpecError
from toolkit.repository.project import load_project


@pytest.fixture
def models(tmp_path):
    """pre: TEXT BYTES[1] -> IDS INT64[-1]; enc: IDS INT64[-1] -> VEC FP32[8]; norm: VEC -> OUT;
    join: A FP32[8], B FP32[8] -> J FP32[8]; small: batches at most 2."""
    write_model(tmp_path, "pre", python_model([("TEXT", "BYTES", [1])], [("IDS", "INT64", [-1])]))
    write_model(tmp_path, "enc", python_model([("IDS", "INT64", [-1])], [("VEC", "FP32", [8])]))
    write_model(tmp_path, "norm", python_model([("VEC", "FP32", [8])], [("OUT", "FP32", [8])]))
    write_model(tmp_path, "join", python_model([("A", "FP32", [8]), ("B", "FP32", [8])], [("J", "FP32", [8])]))
    write_model(tmp_path, "small", python_model([("VEC", "FP32", [8])], [("OUT", "FP32", [8])],
                                                max_batch_size=2))
    return tmp_path


def ensemble(steps, inputs=(("text", "BYTES", [1]),), outputs=(("emb", "FP32", [8]),), mbs=8):
    return {"max_batch_size": mbs,
            "inputs": [{"name": n, "dtype": t, "dims": d} for n, t, d in inputs],
            "outputs": [{"name": n, "dtype": t, "dims": d} for n, t, d in outputs],
            "steps": [{"model": m, "inputs": i, "outputs": o} for m, i, o in steps]}


CHAIN = [("pre", {"TEXT": "text"}, {"IDS": "ids"}), ("enc", {"IDS": "ids"}, {"VEC": "vec"}),
         ("norm", {"VEC": "vec"}, {"OUT": "emb"})]


def problems(root, spec) -> str:
    write_ensemble(root, "pipe", spec)
    with pytest.raises(SpecError) as info:
        load_project(root / "models", root / "ensembles")
    return str(info.value)


def test_check_accepts_a_chain_in_any_listed_order(models):
    write_ensemble(models, "pipe", ensemble(list(reversed(CHAIN))))
    project = load_project(models / "models", models / "ensembles")
    assert [s.model for s in project.ensembles["pipe"].spec.steps] == ["norm", "enc", "pre"]


def test_check_accepts_fan_out_and_fan_in(models):
    steps = [*CHAIN[:2], ("norm", {"VEC": "vec"}, {"OUT": "a"}), ("join", {"A": "a", "B": "vec"}, {"J": "emb"})]
    write_ensemble(models, "pipe", ensemble(steps))
    assert load_project(models / "models", models / "ensembles").ensembles["pipe"]


@pytest.mark.parametrize(("steps", "words"), [
    ([*CHAIN[:2], ("nope", {"VEC": "vec"}, {"OUT": "emb"})], "step model 'nope' does not exist"),
    ([*CHAIN[:2], ("norm", {"VECTOR": "vec"}, {"OUT": "emb"})], "model 'norm' has no input 'VECTOR'"),
    ([*CHAIN[:2], ("norm", {}, {"OUT": "emb"})], "required input 'VEC' of model 'norm' is not mapped"),
    ([*CHAIN[:2], ("norm", {"VEC": "vec"}, {"RESULT": "emb"})], "model 'norm' has no output 'RESULT'"),
    ([*CHAIN[:2], ("norm", {"VEC": "vek"}, {"OUT": "emb"})],
     "tensor 'vek' consumed by steps[2] (norm) is neither an ensemble input nor produced by any step"),
    ([*CHAIN, ("norm", {"VEC": "vec"}, {"OUT": "emb"})],
     "tensor 'emb' has two producers: steps[2] (norm) and steps[3] (norm)"),
    ([CHAIN[0], ("enc", {"IDS": "ids"}, {"VEC": "text"}), CHAIN[2]],
     "tensor 'text' is an ensemble input and cannot also be produced"),
    ([("pre", {"TEXT": "text"}, {"IDS": "ids"}), ("norm", {"VEC": "ids"}, {"OUT": "emb"})],
     "tensor 'ids' is INT64 [-1, -1] (output 'IDS' of steps[0] (pre)) but model 'norm' input 'VEC' expects FP32"),
    (CHAIN[:2], "ensemble output 'emb' is not produced by any step"),
    ([CHAIN[0], ("enc", {"IDS": "ids"}, {"VEC": "vec"}), ("norm", {"VEC": "vec"}, {"OUT": "out"}),
      ("join", {"A": "out", "B": "vec"}, {"J": "emb"}), ("small", {"VEC": "vec"}, {"OUT": "spare"})],
     "tensor 'spare' produced by steps[4] (small) is never used"),
    ([*CHAIN[:2], ("small", {"VEC": "vec"}, {"OUT": "emb"})],
     "ensemble max_batch_size 8 exceeds model 'small' max_batch_size 2"),
    ([*CHAIN[:2], ("pipe", {"text": "vec"}, {"emb": "emb"})], "an ensemble cannot contain itself"),
])
def test_check_names_step_and_tensor_when_the_dag_is_miswired(models, steps, words):
    message = problems(models, ensemble(steps))
    assert "ensembles/pipe.yaml" in message and "model 'pipe'" in message
    assert words in message, message


def test_check_names_the_steps_of_a_cycle(models):
    steps = [*CHAIN[:2], ("join", {"A": "y", "B": "vec"}, {"J": "x"}), ("norm", {"VEC": "x"}, {"OUT": "y"}),
             ("small", {"VEC": "vec"}, {"OUT": "emb"})]
    message = problems(models, ensemble(steps, mbs=2))
    assert "the steps form a cycle: steps[2] (join) -> steps[3] (norm) -> steps[2] (join)" in message


def test_check_rejects_unused_ensemble_input(models):
    spec = ensemble(CHAIN, inputs=(("text", "BYTES", [1]), ("spare", "FP32", [1])))
    assert "ensemble input 'spare' is not used by any step" in problems(models, spec)


def test_check_rejects_output_declared_with_wrong_dims(models):
    spec = ensemble(CHAIN, outputs=(("emb", "FP32", [16]),))
    assert "ensemble output 'emb' is declared FP32 [-1, 16] but output 'OUT' of steps[2] (norm)" in problems(
        models, spec)


def test_check_rejects_ensembles_that_contain_each_other(models):
    write_ensemble(models, "outer", ensemble([("pipe", {"text": "text"}, {"emb": "emb"})]))
    spec = ensemble([("outer", {"text": "text"}, {"emb": "emb"})])
    assert "ensembles contain each other in a loop" in problems(models, spec)
