"""The roofline: FLOPs counted from hand-built ONNX graphs, the peak sweep, the CPU flags, the report."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from toolkit.bench.loadgen import PointSpec, TargetSpec, _summarise
from toolkit.bench.report import evaluate_targets, write_markdown
from toolkit.bench.roofline import TokenFlops, count_flops, cpu_features, matmul_peak
from toolkit.errors import BenchError

HIDDEN, FFN, HEADS, LAYERS = 384, 1536, 12, 6


def _save(tmp_path, nodes, inputs, outputs, weights, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(w, name) for name, w in weights.items()])
    opsets = [helper.make_opsetid("", 17), *(helper.make_opsetid(d, 1) for d in domains)]
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), str(path))
    return path


def _minilm_like(tmp_path):
    """MiniLM-L6's matrix products (no embeddings, no norms): per layer Q, K, V, out (384x384),
    Q.K^T and weights.V over 12 heads of 32, FFN 384x1536 and back; input [1, L, 384]."""
    nodes, weights = [], {"heads": np.array([1, -1, HEADS, HIDDEN // HEADS], np.int64),
                          "merged": np.array([1, -1, HIDDEN], np.int64)}
    x = "x"
    for i in range(LAYERS):
        for p in "qkvo":
            weights[f"w{p}{i}"] = np.zeros((HIDDEN, HIDDEN), np.float32)
        weights[f"up{i}"] = np.zeros((HIDDEN, FFN), np.float32)
        weights[f"down{i}"] = np.zeros((FFN, HIDDEN), np.float32)
        for p in "qkv":
            nodes += [helper.make_node("MatMul", [x, f"w{p}{i}"], [f"{p}{i}"]),
                      helper.make_node("Reshape", [f"{p}{i}", "heads"], [f"{p}h{i}"]),
                      helper.make_node("Transpose", [f"{p}h{i}"], [f"{p}t{i}"],
                                       perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3])]
        nodes += [helper.make_node("MatMul", [f"qt{i}", f"kt{i}"], [f"s{i}"]),
                  helper.make_node("Softmax", [f"s{i}"], [f"p{i}"], axis=-1),
                  helper.make_node("MatMul", [f"p{i}", f"vt{i}"], [f"c{i}"]),
                  helper.make_node("Transpose", [f"c{i}"], [f"ct{i}"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", [f"ct{i}", "merged"], [f"m{i}"]),
                  helper.make_node("MatMul", [f"m{i}", f"wo{i}"], [f"o{i}"]),
                  helper.make_node("Add", [f"o{i}", x], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"up{i}"], [f"u{i}"]),
                  helper.make_node("Relu", [f"u{i}"], [f"g{i}"]),
                  helper.make_node("MatMul", [f"g{i}", f"down{i}"], [f"h{i}"])]
        x = f"h{i}"
    nodes.append(helper.make_node("Identity", [x], ["y"]))
    return _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L", HIDDEN])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "L", HIDDEN])], weights)


def test_token_flops_of_a_minilm_like_graph_are_21_2_mflop_per_token_plus_attention(tmp_path):
    flops = TokenFlops.of(_minilm_like(tmp_path))
    assert flops.linear == LAYERS * 2 * (4 * HIDDEN ** 2 + 2 * HIDDEN * FFN) == 21_233_664
    assert flops.quadratic == LAYERS * 2 * 2 * HIDDEN  # Q.K^T and weights.V: 2 x 2 x L x 384 per token
    assert flops.constant == 0
    assert flops(31) == pytest.approx(31 * 21_233_664 + 31 ** 2 * 9216)


def test_matmul_and_gemm_count_two_flops_per_multiply_add_and_only_for_the_asked_outputs(tmp_path):
    weights = {"b": np.ones((4, 8), np.float32), "c": np.ones((5, 3), np.float32),
               "d": np.ones((4, 16), np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "b"], ["y"]),                 # [2, 3, 4] x [4, 8]
             helper.make_node("Gemm", ["c", "z"], ["w"], transA=1),          # [5, 3]^T x [5, 7]
             helper.make_node("MatMul", ["x", "d"], ["unused"])]            # [2, 3, 4] x [4, 16]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4]),
                                   helper.make_tensor_value_info("z", TensorProto.FLOAT, [5, 7])],
                 [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "w", "unused")], weights)
    count = count_flops(path, {"x": [2, 3, 4], "z": [5, 7]}, outputs=["y", "w"])
    assert count.by_op == {"MatMul": 2 * 2 * 3 * 4 * 8, "Gemm": 2 * 3 * 5 * 7}
    assert count_flops(path, {"x": [2, 3, 4], "z": [5, 7]}).by_op["MatMul"] == 2 * 2 * 3 * 4 * (8 + 16)


def test_conv_counts_its_kernel_per_output_element_grouped_or_not(tmp_path):
    weights = {"w": np.ones((16, 3, 3, 3), np.float32), "dw": np.ones((16, 1, 3, 3), np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["a", "dw"], ["y"], group=16, pads=[1, 1, 1, 1])]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)
    count = count_flops(path, {"x": [2, 3, 32, 32]})
    out = 2 * 16 * 16 * 16  # batch 2, 16 channels, 16x16 after stride 2
    assert count.flops == 2 * out * 3 * 9 + 2 * out * 1 * 9


def test_a_fused_attention_counts_its_projection_and_both_products(tmp_path):
    """com.microsoft Attention (what onnxruntime's transformer optimizer makes of Q/K/V)."""
    weights = {"w": np.zeros((HIDDEN, 3 * HIDDEN), np.float32), "bias": np.zeros(3 * HIDDEN, np.float32)}
    nodes = [helper.make_node("Attention", ["x", "w", "bias"], ["y"], domain="com.microsoft", num_heads=HEADS)]
    path = _save(tmp_path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L", HIDDEN])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights, ["com.microsoft"])
    flops = TokenFlops.of(path)
    assert flops.linear == 2 * HIDDEN * 3 * HIDDEN and flops.quadratic == 2 * 2 * HIDDEN


def test_counting_names_the_inputs_when_a_shape_is_missing(tmp_path):
    path = _save(tmp_path, [helper.make_node("MatMul", ["x", "b"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"b": np.ones((4, 4), np.float32)})
    with pytest.raises(BenchError, match=r"give a shape for every input \(\['x'\]\)"):
        count_flops(path, {"image": [1, 4]})
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(BenchError, match=r"cannot read .*bad\.onnx as ONNX"):
        count_flops(tmp_path / "bad.onnx", {"x": [2, 4]})


def test_the_peak_sweep_is_bounded_and_names_its_best_shape():
    started = time.perf_counter()
    peak = matmul_peak(((64, 64, 64), (256, 128, 256)), budget_s=0.3, int8_shapes=((64, 64, 64),))
    assert time.perf_counter() - started < 10
    assert all(s["gflops"] > 0 and s["runs"] >= 3 for s in peak["shapes"] + peak["int8"])
    assert peak["int8"][0]["vs_fp32"] == pytest.approx(peak["int8"][0]["gflops"] / peak["shapes"][0]["gflops"])
    assert peak["int8"][0]["vs_peak"] == pytest.approx(peak["int8"][0]["gflops"] / peak["peak_gflops"])
    assert peak["peak_gflops"] == max(s["gflops"] for s in peak["shapes"])
    assert peak["best_shape"] in ([64, 64, 64], [256, 128, 256])
    with pytest.raises(BenchError, match="positive time budget"):
        matmul_peak(budget_s=0)


@pytest.mark.parametrize(("flags", "vnni"), [("fpu avx avx2 fma", False), ("avx2 avx512f avx512_vnni", True),
                                             ("avx2 avx_vnni", True), ("", False)])
def test_cpu_features_say_whether_int8_has_vnni(flags, vnni):
    features = cpu_features(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert features["vnni"] is vnni and features["flags"]["avx2"] is ("avx2" in flags)


def test_a_point_counts_the_flops_of_the_requests_completed_in_its_window():
    spec = PointSpec(TargetSpec("triton-grpc", "x", "m"), [b"a", b"b", b"c"], concurrency=1, warmup_s=1,
                     measure_s=2, items=2, flops=(1e9, 2e9, 3e9))
    assert spec.work(0) == 3e9 and spec.work(1) == 4e9  # payloads (a, b), then (c, a)
    result = _summarise(spec, [(0.5, 0.1, 9e9), (1.5, 0.1, 3e9), (2.5, 0.1, 4e9)], [])
    assert result.completed == 2 and result.gflops == pytest.approx((3 + 4) / 2)


def _results(vnni):
    point = {"load": "concurrency", "value": 64, "throughput": 100.0, "items_per_s": 100.0, "items": 1,
             "p50_ms": 1.0, "p95_ms": 2.0, "p99_ms": 3.0, "errors": 0, "variation": 0.1, "gflops": 66.9,
             "roofline": 0.31}
    data = {"toolkit-fused": {"points": [point]},
            "toolkit-int8": {"points": [{**point, "throughput": 120.0, "items_per_s": 120.0}]}}
    return {"machine": {"cores": 2, "cpu": "x", "python": "3.11",
                        "cpu_features": {"flags": {"avx2": True, "avx512_vnni": vnni}, "vnni": vnni}},
            "plan": {"concurrencies": [64], "rates": [], "bulk": [0, 0], "warmup_s": 1, "measure_s": 2},
            "roofline": {"peak_gflops": 213.4, "best_shape": [640, 384, 1536], "threads": "default", "seconds": 15,
                         "shapes": [{"m": 640, "k": 384, "n": 1536, "gflops": 213.4, "best_ms": 3.5,
                                     "median_ms": 4.0, "runs": 40}],
                         "int8": [{"m": 640, "k": 384, "n": 1536, "gflops": 400.0, "best_ms": 1.9, "median_ms": 2.0,
                                   "runs": 40, "vs_fp32": 1.87, "vs_peak": 1.87}]},
            "flops": {"embedding": {"per_item_mean": 6.69e8, "tokens_mean": 30.9, "tokens_max": 110,
                                    "formula": {"constant": 0, "linear": 21233664, "quadratic": 9216}}},
            "workloads": {"embedding": data}}


@pytest.mark.parametrize("vnni", [False, True])
def test_the_report_gives_gflops_roofline_and_holds_int8_to_1_5x_only_with_vnni(tmp_path, vnni):
    results = _results(vnni)
    results["targets"] = evaluate_targets(results["workloads"], results["machine"]["cpu_features"])
    (int8,) = [t for t in results["targets"] if t["target"].startswith("toolkit-int8")]
    assert int8["measured"] == pytest.approx(1.2) and int8["met"] is (False if vnni else None)
    write_markdown(results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "| req/s | items/s | GFLOP/s | roofline | p50 ms |" in report
    assert "| toolkit-fused | c=64 | 100.0 | 100.0 | 66.9 | 0.31 | 1.0 |" in report
    assert "Matrix-product peak: **213.4 GFLOP/s**" in report and "| 640x384x1536 | 213.4 |" in report
    assert "int8 (MatMulInteger, GOP/s: 1.87x the fp32 peak, 1.87x this shape's fp32) | 400.0 |" in report
    assert "mean **0.669 GFLOP** at 30.9 tokens" in report and "21.234 M x L + 9.216 k x L^2" in report
    assert ("VNNI: yes" if vnni else "VNNI: no") in report
    assert ("| **no** |" if vnni else "none without VNNI (>= 1.5 with it) | n/a |") in report


def test_an_int8_matmul_counts_like_the_float_one_it_replaces(tmp_path):
    """`toolkit export bert --quantize int8` turns MatMul into MatMulInteger: the same work."""
    path = _save(tmp_path, [helper.make_node("MatMulInteger", ["x", "w"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, "L", 8])],
                 [helper.make_tensor_value_info("y", TensorProto.INT32, None)], {"w": np.ones((8, 16), np.int8)})
    assert TokenFlops.of(path).linear == 2 * 8 * 16


def test_a_workload_whose_flops_could_not_be_counted_says_so_and_keeps_its_rows(tmp_path):
    results = _results(False)
    results["flops"]["embedding"] = {"failed": "model.onnx: input image ['n', 'h', 'w', 3] has variable dims"}
    for entry in results["workloads"]["embedding"].values():
        for p in entry["points"]:
            del p["roofline"]
    results["targets"] = evaluate_targets(results["workloads"], results["machine"]["cpu_features"])
    write_markdown(results, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "FLOPs per item: **not counted** (model.onnx: input image" in report
    assert "| toolkit-fused | c=64 | 100.0 | 100.0 | 66.9 | - | 1.0 |" in report
