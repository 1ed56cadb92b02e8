"""The c=64 breakdown's pieces without a server: statistics deltas, BERT's batches reproduced through
the served bucketing, their padding, an onnxruntime profile by operator, and the two tables."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.bench.breakdown import batch_table, padding, profile_batches, reproduce_batches, request_table, stats_delta
from toolkit.bench.roofline import TokenFlops
from toolkit.errors import BenchError

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon"]


def _stats(count, executions, ns, sizes):
    phases = ("success", "queue", "compute_input", "compute_infer", "compute_output")
    return {"model_stats": [{"name": "bert", "execution_count": executions, "inference_stats": {
        p: {"count": count, "ns": ns * (i + 1)} for i, p in enumerate(phases)},
        "batch_stats": [{"batch_size": b, "compute_infer": {"count": n, "ns": 0}} for b, n in sizes.items()]}]}


def test_stats_delta_gives_the_windows_requests_batches_phases_and_batch_sizes():
    delta = stats_delta(_stats(10, 4, 100, {1: 2, 8: 2}), _stats(30, 9, 400, {1: 2, 8: 5, 4: 2}))
    assert delta["bert"]["requests"] == 20 and delta["bert"]["executions"] == 5
    assert delta["bert"]["ns"]["success"] == 300 and delta["bert"]["ns"]["compute_output"] == 1500
    assert delta["bert"]["batch_sizes"] == {4: 2, 8: 3}


@pytest.fixture
def bert_dir(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS]) + "\n")
    (tmp_path / "export.json").write_text(json.dumps({"do_lower_case": True}))
    return tmp_path


def _config():
    tensor = {"data_type": "TYPE_INT64", "dims": [-1]}
    return {"max_batch_size": 64,
            "input": [{"name": n, **tensor} for n in ("input_ids", "attention_mask", "token_type_ids")],
            "output": [{"name": "last_hidden_state", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
            "parameters": {"toolkit.pad.input_ids": {"string_value": "0"},
                           "toolkit.pad.attention_mask": {"string_value": "0"},
                           "toolkit.pad.token_type_ids": {"string_value": "0"},
                           "toolkit.trim.last_hidden_state": {"string_value": "input_ids"},
                           "toolkit.bucket_cost": {"string_value": "2"}}}


def test_reproduced_batches_are_bucketed_as_served_and_their_padding_is_counted(bert_dir):
    texts = [" ".join(WORDS[:n]) for n in (1, 5, 1, 2, 5)]  # 3, 7, 3, 4, 7 tokens with [CLS]/[SEP]
    batches = reproduce_batches(bert_dir, _config(), texts, {4: 1, 1: 1}, seed=1)
    assert sorted(sum(len(f["input_ids"]) for f in calls) for calls in batches) == [1, 4]
    four = next(calls for calls in batches if sum(len(f["input_ids"]) for f in calls) == 4)
    for feed in four:  # every bucket is cut to its longest row
        assert feed["attention_mask"].sum(axis=1).max() == feed["input_ids"].shape[1]
    flops = TokenFlops(0.0, 10.0, 1.0, {})
    pad = padding(batches, flops)
    real = sum(float(np.sum(flops(f["attention_mask"].sum(axis=1)))) for calls in batches for f in calls)
    ran = sum(len(f["input_ids"]) * flops(f["input_ids"].shape[1]) for calls in batches for f in calls)
    assert pad["real_gflop_per_batch"] == pytest.approx(real / 2e9) and pad["waste"] == pytest.approx(1 - real / ran)
    with pytest.raises(BenchError, match="no BERT batches"):
        reproduce_batches(bert_dir, _config(), texts, {})


def test_the_profile_sums_onnxruntime_kernels_by_operator(tmp_path, bert_dir):
    nodes = [helper.make_node("Gather", ["table", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["last_hidden_state"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("last_hidden_state",
                                                                                 TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((9, 4), np.float32), "table"),
                               numpy_helper.from_array(np.ones((4, 4), np.float32), "w")])
    model = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(model))
    batches = reproduce_batches(bert_dir, _config(), ["alpha beta", "gamma"], {2: 3})
    profile = profile_batches(model, batches)
    assert profile["batches"] == 3 and profile["threads"] == 1
    assert set(profile["op_ms_per_batch"]) >= {"MatMul", "Gather"}
    assert profile["run_ms_per_batch"] >= sum(profile["op_ms_per_batch"].values()) > 0
    assert profile["cpu_ms_per_batch"] > 0 and profile["profiled_cpu_ms_per_batch"] > 0


def _window():
    ns = {"success": 0, "queue": 0, "compute_input": 0, "compute_infer": 0, "compute_output": 0}
    steps = {m: {"requests": 100, "executions": 10, "ns": {**ns, "queue": 2e8, "compute_infer": 5e8}}
             for m in ("tokenizer", "bert")}
    steps["embedding"] = {"requests": 100, "executions": 100, "ns": {**ns, "success": 2e9}}
    return {"seconds": 1.0, "point": {"mean_ms": 25.0},
            "cpu_s": {"tritonserver": 0.1, "bert": 1.2, "tokenizer": 0.2, "load client": 0.1},
            "stats": steps}


def test_the_batch_table_accounts_for_every_core_ms_of_a_batch():
    profile = {"run_ms_per_batch": 200.0, "cpu_ms_per_batch": 100.0,  # wall ms on a busy machine: twice the CPU
               "op_ms_per_batch": {"MatMul": 120.0, "FusedMatMul": 20.0, "Add": 40.0}}
    rows = {r["part"]: r for r in batch_table(_window(), profile, {"waste": 0.25}, cores=2)}
    assert rows["BERT: matrix products (onnxruntime kernels)"]["cpu_ms_per_batch"] == 70.0
    assert rows["  of which padding (padded FLOPs' share)"]["cpu_ms_per_batch"] == 17.5
    assert rows["BERT stub, the rest (hook, buckets, stacking, stub hand-off)"]["cpu_ms_per_batch"] == 20.0
    assert rows["not ours: idle or other processes"]["cpu_ms_per_batch"] == pytest.approx(200 - 160)
    assert sum(r["share"] for p, r in rows.items() if "of which" not in p) == pytest.approx(1.0)
    assert rows["tokenizer stub"]["of_ours"] == pytest.approx(20 / 160)


def test_the_request_table_leaves_the_hand_offs_and_the_protocol_as_the_remainders():
    rows = {r["part"]: r["ms"] for r in request_table(_window(), "embedding", ("tokenizer", "bert"))}
    assert rows["bert: queue"] == 2.0 and rows["tokenizer: compute infer"] == 5.0
    assert rows["hand-offs between steps (ensemble end-to-end minus the steps)"] == pytest.approx(20 - 14)
    assert rows["protocol and client (client latency minus the ensemble's end-to-end)"] == pytest.approx(5.0)
