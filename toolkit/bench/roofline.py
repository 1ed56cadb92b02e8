"""The roofline: what this machine's matrix products can do, and how many FLOPs a request costs.

A throughput in req/s says little across machines and models; the same throughput in GFLOP/s, next
to the machine's own matrix-product peak, says how much of the hardware the server actually uses.

    peak = matmul_peak(budget_s=15)                 # onnxruntime MatMul, best of a shape sweep
    flops = TokenFlops.of(Path("bert/1/model.onnx"), outputs=["last_hidden_state"])
    flops(31)                                       # FLOPs of one 31-token request, no padding
    count_flops(Path("mobilenet/1/model.onnx"), {"image": [1, 224, 224, 3]})

FLOPs are those of the matrix products (MatMul, Gemm, Conv, their quantized and fused forms, the
projections and products inside com.microsoft Attention), 2 per multiply-add, counted node by node
from the ONNX graph at the shapes it really runs with. Element-wise operators, softmax and layer
norms are left out: they are what the roofline does not cover. The shapes come from one onnxruntime
run with graph optimizations off (every node of the file runs as written) and its profiler, which
records each node's output shapes: onnx's own shape inference loses the batch dimension of a
tf2onnx BERT at the position-embedding Slice, and onnxruntime's symbolic inference needs sympy.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import BenchError

#: (rows, inner, columns): MiniLM's own products at 640 tokens per batch (Q/K/V/out, FFN up, FFN
#: down), the same at a small batch, and square ones where the kernels usually peak.
PEAK_SHAPES = ((640, 384, 384), (640, 384, 1536), (640, 1536, 384), (128, 384, 1536),
               (512, 512, 512), (1024, 1024, 1024), (2048, 2048, 2048))

#: MiniLM's FFN products again as int8 (MatMulInteger), beside their fp32 peak.
INT8_SHAPES = ((640, 384, 1536), (640, 1536, 384))

#: Each shape's turn in a round of the sweep lasts at least this long (one run of a large shape).
TURN_S = 0.02

#: CPU flags that decide how fast onnxruntime's int8 kernels can be (/proc/cpuinfo spellings).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """The int8-relevant flags of this CPU and whether it has VNNI (int8 dot products in one
    instruction: AVX512-VNNI, AVX-VNNI or AMX). ``vnni`` is None where /proc/cpuinfo is unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"flags": {}, "vnni": None}
    line = next((x for x in cpuinfo.splitlines() if x.startswith("flags")), "")
    present = set(line.partition(":")[2].split())
    flags = {f: f in present for f in CPU_FLAGS}
    return {"flags": flags, "vnni": bool(present) and any(flags[f] for f in ("avx512_vnni", "avx_vnni", "amx_int8"))}


# ----------------------------------------------------------------------------- the peak
def _matmul_model(m: int, k: int, n: int, int8: bool = False) -> bytes:
    """One MatMul, or with ``int8`` one MatMulInteger (uint8 activations by int8 weights, what the
    dynamic quantization of `toolkit export bert --quantize int8` runs)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (k, n), dtype=np.int8) if int8 else rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger" if int8 else "MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.UINT8 if int8 else TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("c", TensorProto.INT32 if int8 else TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def matmul_peak(shapes: tuple[tuple[int, int, int], ...] = PEAK_SHAPES, budget_s: float = 15.0,
                threads: int = 0, int8_shapes: tuple[tuple[int, int, int], ...] = INT8_SHAPES) -> dict[str, Any]:
    """The machine's matrix-product peak: one onnxruntime MatMul per shape, in this process, with
    onnxruntime's default threads (``threads`` 0: every core). The shapes take turns, a round at a
    time, until ``budget_s`` has gone by (at least 3 rounds), so a busy minute on a shared machine
    slows every shape alike; each shape counts its fastest run: GFLOP/s = 2*m*k*n / that run.

    ``int8_shapes`` take their turns too, as MatMulInteger: int8 GOP/s and the ratio to the fp32
    MatMul of the same shape, the kernel-level reason int8 gains what it gains on this CPU."""
    import onnxruntime as ort

    if not shapes or budget_s <= 0:
        raise BenchError("the peak sweep needs at least one shape and a positive time budget")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    rng = np.random.default_rng(1)
    runs = []
    for (m, k, n), int8 in [(s, False) for s in shapes] + [(s, True) for s in int8_shapes]:
        session = ort.InferenceSession(_matmul_model(m, k, n, int8), options, providers=["CPUExecutionProvider"])
        a = rng.integers(0, 256, (m, k), dtype=np.uint8) if int8 else rng.standard_normal((m, k)).astype(np.float32)
        session.run(None, {"a": a})  # warm-up: allocations and the thread pool
        runs.append((session, {"a": a}, [m, k, n], []))
    start, rounds = time.perf_counter(), 0
    while rounds < 3 or time.perf_counter() - start < budget_s:
        for session, feed, _, times in runs:
            turn = time.perf_counter()
            while True:  # a small shape runs several times a turn
                t = time.perf_counter()
                session.run(None, feed)
                times.append(time.perf_counter() - t)
                if t + times[-1] - turn >= TURN_S:
                    break
        rounds += 1
    measured = [{"m": m, "k": k, "n": n, "gflops": 2 * m * k * n / min(times) / 1e9, "best_ms": min(times) * 1e3,
                 "median_ms": float(np.median(times)) * 1e3, "runs": len(times)}
                for _, _, (m, k, n), times in runs]
    results, int8 = measured[:len(shapes)], measured[len(shapes):]
    fp32 = {(r["m"], r["k"], r["n"]): r["gflops"] for r in results}
    top = max(results, key=lambda r: r["gflops"])
    for r in int8:
        r["vs_fp32"] = r["gflops"] / fp32[(r["m"], r["k"], r["n"])] if (r["m"], r["k"], r["n"]) in fp32 else None
        r["vs_peak"] = r["gflops"] / top["gflops"]
    return {"peak_gflops": top["gflops"], "best_shape": [top["m"], top["k"], top["n"]], "shapes": results,
            "int8": int8, "threads": threads or "onnxruntime default (every core)",
            "seconds": time.perf_counter() - start}


def measure_peak(budget_s: float = 15.0) -> dict[str, Any]:
    """``matmul_peak`` in a fresh process: the caller's own threads and imports stay out of it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(matmul_peak, (PEAK_SHAPES, budget_s))


# ----------------------------------------------------------------------------- FLOPs from the graph
_MATMULS = {"MatMul", "MatMulInteger", "FusedMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
            "QLinearMatMul", "MatMulNBits", "Gemm"}
_CONVS = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "FusedConv": 1, "NhwcConv": 1}


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _node_flops(node, shape) -> int:
    """Matrix-product FLOPs of one node; ``shape(name)`` gives a tensor's shape as it ran."""
    op, attrs = node.op_type, _attrs(node)
    if op in _MATMULS:
        a = shape(node.input[0])
        out = shape(node.output[0])
        if op == "Gemm":
            inner = a[0] if attrs.get("transA") else a[-1]
        elif op == "FusedMatMul" and attrs.get("transA"):
            inner = a[-2]
        else:
            inner = a[-1]
        return 2 * math.prod(out) * inner
    if op in _CONVS:
        return 2 * math.prod(shape(node.output[0])) * math.prod(shape(node.input[_CONVS[op]])[1:])
    if op == "ConvTranspose":
        return 2 * math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])
    if op == "Einsum" and len(node.input) == 2:
        return _einsum_flops(attrs["equation"], shape(node.input[0]), shape(node.input[1]))
    if op == "Attention":  # com.microsoft: QKV projection, then Q.K^T and softmax(.).V per head
        x, w = shape(node.input[0]), shape(node.input[1])
        sizes = attrs.get("qkv_hidden_sizes") or [w[1] // 3] * 3
        tokens, seq = math.prod(x[:-1]), x[-2]
        return 2 * tokens * x[-1] * w[1] + 2 * tokens * seq * (sizes[0] + sizes[2])
    if op == "MultiHeadAttention" and len(node.input) >= 3 and node.input[1] and node.input[2]:
        q, k, v = shape(node.input[0]), shape(node.input[1]), shape(node.input[2])
        if len(q) == 3 and len(k) == 3 and len(v) == 3:
            return 2 * math.prod(q[:-1]) * k[1] * (q[-1] + v[-1])
    return 0


def _einsum_flops(equation: str, a: list[int], b: list[int]) -> int:
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for letters, dims in zip(inputs, (a, b), strict=True):
        if "." in letters:
            return 0  # ellipsis: not counted
        sizes.update(zip(letters, dims, strict=True))
    return 2 * math.prod(sizes.values())


@dataclass(frozen=True)
class Count:
    """Matrix-product FLOPs of one run, and per operator type."""

    flops: int
    by_op: dict[str, int]


def count_runs(model_path: Path, feeds_shapes: list[dict[str, list[int]]],
               outputs: list[str] | None = None) -> list[Count]:
    """The matrix-product FLOPs of one run of the model per entry of ``feeds_shapes`` (input name
    -> shape; inputs get ones), for ``outputs`` only (default: all). Nodes the outputs do not need
    are not run, so they are not counted."""
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(str(model_path))
    except Exception as e:
        raise BenchError(f"cannot read {model_path} as ONNX: {e}") from e
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"node_{i}"
    if outputs:
        _keep_only(model.graph, outputs)
    init = {t.name: list(t.dims) for t in model.graph.initializer}
    counted = [n for n in model.graph.node if n.op_type in _MATMULS | set(_CONVS) | {
        "ConvTranspose", "Einsum", "Attention", "MultiHeadAttention"}]
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.log_severity_level = 3  # the pruned outputs' unused initializers are not news
        options.profile_file_prefix = str(Path(tmp) / "flops")
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in session.get_inputs()}
        runs = []
        for shapes in feeds_shapes:
            unknown = set(shapes) ^ set(types)
            if unknown:
                raise BenchError(f"{model_path.name}: give a shape for every input ({sorted(types)}), "
                                 f"got {sorted(shapes)}")
            feeds = {name: np.ones(s, dtype=_NUMPY[types[name]]) for name, s in shapes.items()}
            try:
                session.run(outputs, feeds)
            except Exception as e:  # onnxruntime's own errors: a wrong rank, a shape the graph refuses
                raise BenchError(f"{model_path.name} would not run at {shapes}: {e}") from e
            runs.append(shapes)
        events = json.loads(Path(session.end_profiling()).read_text())
    parts = _per_run(events)
    if len(parts) != len(runs):
        raise BenchError(f"onnxruntime's profile of {model_path.name} holds {len(parts)} runs, expected {len(runs)}")
    return [_count(counted, init, part) for part in parts]


def _keep_only(graph, outputs: list[str]) -> None:
    """Drop the nodes and outputs that ``outputs`` do not need (onnxruntime runs every node)."""
    missing = set(outputs) - {o.name for o in graph.output}
    if missing:
        raise BenchError(f"the model has no output(s) {sorted(missing)}")
    needed, keep = set(outputs), []
    for node in reversed(graph.node):
        if needed & set(node.output):
            keep.append(node)
            needed |= {x for x in node.input if x}
    kept_outputs = [o for o in graph.output if o.name in outputs]
    del graph.node[:], graph.output[:]
    graph.node.extend(reversed(keep))
    graph.output.extend(kept_outputs)


_NUMPY = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
          "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(float16)": np.float16,
          "tensor(double)": np.float64, "tensor(bool)": np.bool_}


def _per_run(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The profiler's node events, one list per ``session.run`` (cut at its ``model_run`` event)."""
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return [[e for e in nodes if start <= e["ts"] <= end] for start, end in runs]


def _count(counted, init: dict[str, list[int]], events) -> Count:
    """Sum ``_node_flops`` over the counted nodes that ran; each node's tensors take the shapes the
    profiler recorded for it (its inputs that are not initializers, and its outputs)."""
    ran = {e["name"][:-len("_kernel_time")]: e["args"] for e in events}
    by_op: dict[str, int] = {}
    for node in counted:
        args = ran.get(node.name)
        if args is None:
            continue  # not needed for the requested outputs
        fed = [x for x in node.input if x and x not in init]
        shapes = {**init, **_typed(fed, args.get("input_type_shape", [])),
                  **_typed(list(node.output), args.get("output_type_shape", []))}

        def shape(name: str, shapes=shapes, node=node) -> list[int]:
            if name not in shapes:
                raise BenchError(f"no shape for tensor {name!r} of {node.op_type} node {node.name!r}")
            return shapes[name]

        by_op[node.op_type] = by_op.get(node.op_type, 0) + _node_flops(node, shape)
    return Count(sum(by_op.values()), by_op)


def _typed(names: list[str], typed: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    """The profiler's ``[{"float": [1, 20, 384]}, ...]`` by tensor name."""
    return {name: [int(d) for d in next(iter(t.values()))] for name, t in zip(names, typed, strict=False)}


def count_flops(model_path: Path, shapes: dict[str, list[int]], outputs: list[str] | None = None) -> Count:
    """Matrix-product FLOPs of one run at input ``shapes`` (e.g. {"image": [1, 224, 224, 3]})."""
    return count_runs(model_path, [shapes], outputs)[0]


@dataclass(frozen=True)
class TokenFlops:
    """A text model's FLOPs per sequence of ``length`` tokens, no padding: ``constant + linear *
    length + quadratic * length**2`` (the quadratic part is attention's Q.K^T and weights.V)."""

    constant: float
    linear: float
    quadratic: float
    by_op: dict[str, int]  # at FIT_LENGTHS[-1] tokens

    FIT_LENGTHS = (8, 16, 32)
    CHECK_LENGTH = 96

    def __call__(self, length: int | np.ndarray) -> float | np.ndarray:
        return self.constant + self.linear * length + self.quadratic * np.square(length)

    @classmethod
    def of(cls, model_path: Path, outputs: list[str] | None = None) -> TokenFlops:
        """Counted at three lengths (every input's first variable dim 1, the batch, its other
        variable dims the length), solved for the three coefficients, and checked at a fourth: a
        model whose cost is not such a polynomial is refused."""
        import onnxruntime as ort

        inputs = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"]).get_inputs()

        def shapes(length: int) -> dict[str, list[int]]:
            return {i.name: [d if isinstance(d, int) else 1 if axis == 0 else length for axis, d in enumerate(i.shape)]
                    for i in inputs}

        lengths = (*cls.FIT_LENGTHS, cls.CHECK_LENGTH)
        counts = count_runs(model_path, [shapes(L) for L in lengths], outputs)
        fit = np.array(cls.FIT_LENGTHS, dtype=np.float64)
        coeffs = np.linalg.solve(np.stack([np.ones(3), fit, fit ** 2], axis=1),
                                 np.array([c.flops for c in counts[:3]], dtype=np.float64))
        made = cls(*(float(round(c)) for c in coeffs), counts[2].by_op)
        check = counts[3].flops
        if abs(made(cls.CHECK_LENGTH) - check) > 1e-6 * check + 1:
            raise BenchError(f"{model_path.name}: FLOPs per sequence are not a quadratic in its length "
                             f"({check} at {cls.CHECK_LENGTH} tokens, {made(cls.CHECK_LENGTH):.0f} predicted)")
        return made

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- a workload's requests
def workload_flops(kind: str, model_dir: Path, payloads: list[bytes]) -> tuple[list[float], dict[str, Any]]:
    """FLOPs of each payload as one request would cost it, without padding, and a summary.

    ``kind`` "text": the BERT export in ``model_dir`` at each text's own token count; "image": the
    image model at its fixed input size (every image is resized to it), batch 1."""
    model = Path(model_dir) / "model.onnx"
    if kind == "text":
        from toolkit.bench.pipelines import token_counts

        per_token = TokenFlops.of(model)
        lengths = np.array(token_counts(Path(model_dir), [p.decode("utf-8") for p in payloads]))
        flops = [float(f) for f in per_token(lengths)]
        summary = {"model": str(model), "per_item_mean": float(np.mean(flops)), "tokens_mean": float(lengths.mean()),
                   "tokens_max": int(lengths.max()), "formula": per_token.to_dict()}
        return flops, summary
    import onnxruntime as ort

    (image,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()
    if any(not isinstance(d, int) for d in image.shape[1:]):
        raise BenchError(f"{model}: input {image.name} {image.shape} has variable dims besides the batch")
    count = count_flops(model, {image.name: [1, *image.shape[1:]]})
    return [float(count.flops)] * len(payloads), {"model": str(model), "per_item_mean": float(count.flops),
                                                  "input": [1, *image.shape[1:]], "by_op": count.by_op}
