"""fp16 for GPUs: a float16 copy of an export, with float32 inputs and outputs, gated by accuracy.

    toolkit export bert --fp16            toolkit export keras SOURCE --fp16

What is done: onnxruntime's own converter (``onnxruntime.transformers.float16``) turns every float
weight and activation to float16, keeps the graph's float inputs and outputs float32
(``keep_io_types``: clients and the ensemble's other steps see no change) and its default block list
(Min, Max, Range, TopK, ... stay float32). Around it:

- range: the fp32 model runs on the gate's inputs with every float tensor exposed, and the nodes that
  read or write a value within ``HEADROOM`` (4x) of float16's largest (65504) stay float32 (MiniLM:
  its LayerNorm squares, up to 49,920). onnxruntime's CPU provider computes float16 graphs in float32
  and would never show the overflow a GPU hits, so this is decided from the fp32 values;
- clean-up: the converter puts a float32 -> float16 -> float32 pair of Casts between two float32
  nodes; such a pair only loses precision, and on tf2onnx's BERT it breaks the graph (its shape
  arithmetic in float clamps with 1e9, which float16 turns into infinity: the position-embedding
  slice comes out empty). The pairs are removed, duplicate Casts it adds are dropped, and the nodes
  are sorted again (it appends its Casts at the end).

The gate is int8's (``toolkit.export.quantize``) with fp16's own defaults: a BERT is compared with its
fp32 export on the 256 calibration sentences (min and mean cosine of the pooled embedding, rank
agreement of the pairwise similarities); a Keras model on the export check's inputs (min and mean
cosine of each row of each output, and the Spearman correlation of all output values). The fp16 model
is evaluated with onnxruntime's CPU provider (where a kernel has no float16 version onnxruntime runs it
in float32 behind casts): a GPU computes the same graph with its own kernels, which ``./dev.sh
gpu-check`` measures against the CPU (cosine >= 0.999).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx

from toolkit.export.quantize import (
    FP16_GATE,
    Gate,
    QuantizationError,
    QuantizationReport,
    _spearman,
    calibration_feeds,
    calibration_sentences,
    gated_report,
    judge,
)

FLOAT16_MAX = 65504.0
#: A tensor that comes within this factor of float16's largest value on the gate's inputs is computed
#: in float32: other inputs may go higher than the gate's did.
HEADROOM = 4
PROTOBUF_LIMIT = 2**31 - 1
METHOD = ("onnxruntime.transformers.float16: weights and activations float16, inputs and outputs float32, "
          "its default float32 block list; float32 round trips between float32 nodes removed")


def to_fp16(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """The float16 model, the nodes named in ``keep`` left float32 (a new model; ``model`` is changed
    too: pass one nobody else needs)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    _name_nodes(model.graph)
    widened = {n.name for n in model.graph.node if n.op_type == "Cast" and _cast_to(n) == onnx.TensorProto.FLOAT}
    try:
        half = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST,
                                        node_block_list=sorted(keep))
    except Exception as e:  # the converter asserts and raises bare Exceptions on graphs it cannot handle
        raise QuantizationError(f"onnxruntime's float16 converter failed: {type(e).__name__}: {e}") from e
    _skip_half_steps(half.graph, widened)
    _sort_nodes(half.graph)  # the converter appends its Casts at the end; ONNX wants producers first
    return half


def _skip_half_steps(graph: onnx.GraphProto, widened: set[str]) -> None:
    """A Cast that reads a value the conversion put through float16 on its way between two float32
    places reads it before that step: the Casts the converter added after a float32 node or input
    (``*_cast_to_fp16_node``, ``graph_input_cast*``), and the source's own Casts to float that it
    turned into Casts to float16 (``widened``: tf2onnx's int -> float shape arithmetic). The result
    is never less exact; Casts nobody reads any more are removed."""
    _drop_duplicate_casts(graph)
    producer = {out: node for node in graph.node for out in node.output}
    changed = False
    same: dict[str, str] = {}  # a Cast from float to float, now reading a float: its output is its input
    for node in graph.node:
        parent = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if parent is None or parent.op_type != "Cast" or _cast_to(parent) != onnx.TensorProto.FLOAT16:
            continue
        added = parent.name.endswith("_cast_to_fp16_node") or parent.name.startswith("graph_input_cast")
        if added or parent.name in widened:
            node.input[0] = parent.input[0]
            changed = True
            if added and _cast_to(node) == onnx.TensorProto.FLOAT:
                same[node.output[0]] = node.input[0]
    kept = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in same and name not in kept:
                name = same[name]
            node.input[i] = name
    while changed:
        used = {name for node in graph.node for name in _reads(node)} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Cast" and not any(o in used for o in n.output)]
        for node in dead:
            graph.node.remove(node)
        changed = bool(dead)
    produced = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    for info in [v for v in graph.value_info if v.name not in produced]:
        graph.value_info.remove(info)


def _drop_duplicate_casts(graph: onnx.GraphProto) -> None:
    """The converter adds one ``<tensor>_cast_to_fp32`` Cast per float32 node that reads a float16
    tensor: two such readers get two identical Casts with one output name, which ONNX forbids. The
    first stays."""
    seen: dict[str, onnx.NodeProto] = {}
    for node in list(graph.node):
        if node.op_type != "Cast" or len(node.output) != 1:
            continue
        first = seen.setdefault(node.output[0], node)
        if first is not node and list(first.input) == list(node.input) and _cast_to(first) == _cast_to(node):
            graph.node.remove(node)


def _sort_nodes(graph: onnx.GraphProto) -> None:
    """Order the nodes so each comes after the producers of what it reads (a stable Kahn sort; a
    node with a subgraph also waits for the outer values its subgraph reads)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    needs = [{producer[name] for name in _reads(node) if name in producer and producer[name] != i}
             for i, node in enumerate(nodes)]
    readers: dict[int, list[int]] = {}
    for i, deps in enumerate(needs):
        for d in deps:
            readers.setdefault(d, []).append(i)
    waiting = [len(deps) for deps in needs]
    ready = [i for i, n in enumerate(waiting) if n == 0]
    order: list[int] = []
    while ready:
        i = ready.pop(0)
        order.append(i)
        for r in readers.get(i, []):
            waiting[r] -= 1
            if waiting[r] == 0:
                ready.append(r)
    if len(order) != len(nodes):
        raise QuantizationError("the float16 graph has a cycle: onnxruntime's converter broke it")
    graph.ClearField("node")
    graph.node.extend(nodes[i] for i in order)


def _reads(node: onnx.NodeProto) -> set[str]:
    names = {n for n in node.input if n}
    for attribute in node.attribute:
        for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
            for inner in sub.node:
                names |= _reads(inner)
    return names


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def write_fp16(fp32_path: Path, fp16_path: Path, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """Write the float16 copy of ``fp32_path`` (weights in ``<name>.data`` past protobuf's 2 GB) and
    return its graph without weights (which tensors it stores as float16)."""
    half = to_fp16(onnx.load(str(fp32_path)), keep)
    large = _has_external(half) or half.ByteSize() >= PROTOBUF_LIMIT
    onnx.save_model(half, str(fp16_path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{fp16_path.name}.data", size_threshold=1024)
    try:
        onnx.checker.check_model(str(fp16_path))
    except onnx.checker.ValidationError as e:
        raise QuantizationError(f"the float16 model is not valid ONNX: {str(e).splitlines()[0]}") from e
    del half.graph.initializer[:]
    return half


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def activation_peaks(fp32_path: Path, feeds: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
    """The largest finite magnitude every float tensor of the fp32 model (its float inputs too) reaches
    on ``feeds``. onnxruntime's CPU provider runs most float16 ops in float32 (it casts around its
    float32 kernels and drops the casts between two of them), so an activation past float16's 65504
    stays finite there while a GPU turns it into infinity: this is how an fp16 export sees it on a CPU."""
    import onnxruntime as ort

    graph_only = onnx.load(str(fp32_path), load_external_data=False)
    typed = onnx.shape_inference.infer_shapes(graph_only)
    floats = {v.name for v in [*typed.graph.value_info, *typed.graph.output, *typed.graph.input]
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    del graph_only, typed
    probe = onnx.load(str(fp32_path))
    outputs = {o.name for o in probe.graph.output}
    float_inputs = {i.name for i in probe.graph.input if i.name in floats}
    extra = [out for node in probe.graph.node for out in node.output if out in floats and out not in outputs]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in extra)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # every tensor as named
    with tempfile.TemporaryDirectory(prefix="toolkit-fp16-") as tmp:
        path = Path(tmp) / "probe.onnx"
        onnx.save_model(probe, str(path), save_as_external_data=_has_external(probe) or probe.ByteSize()
                        >= PROTOBUF_LIMIT, all_tensors_to_one_file=True, location="probe.onnx.data")
        del probe
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    peaks: dict[str, float] = {}
    for feed in feeds:
        ran = zip(names, session.run(names, {k: v for k, v in feed.items() if k in wanted}), strict=True)
        for name, value in [*ran, *((k, v) for k, v in feed.items() if k in float_inputs)]:
            value = np.asarray(value)
            if value.dtype.kind == "f" and value.size and name in floats:
                finite = np.abs(value[np.isfinite(value)])
                peaks[name] = max(peaks.get(name, 0.0), float(finite.max()) if finite.size else 0.0)
    return peaks


def nodes_to_keep(fp32_path: Path, peaks: dict[str, float]) -> list[str]:
    """The nodes that read or write a tensor within ``HEADROOM`` of float16's largest value: they stay
    float32 (MiniLM: the squares of its LayerNorm variances, up to 49,920 on the calibration sentences)."""
    limit = FLOAT16_MAX / HEADROOM
    graph = onnx.load(str(fp32_path), load_external_data=False).graph
    _name_nodes(graph)
    return sorted(node.name for node in graph.node
                  if any(peaks.get(t, 0.0) >= limit for t in [*node.input, *node.output]))


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Name the unnamed nodes (by position, so every load names them alike): the converter keeps
    nodes float32 by name."""
    taken = {n.name for n in graph.node}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"fp16_unnamed_{i}"
            assert node.name not in taken, node.name


def _fp16_candidate(fp32_path: Path, candidate: Path, feeds) -> dict:
    """Write the float16 ``candidate``, keeping float32 where float16 has too little range; what to
    record about its range (the largest tensor stored as float16, the nodes kept float32)."""
    peaks = activation_peaks(fp32_path, feeds)
    keep = nodes_to_keep(fp32_path, peaks)
    half = write_fp16(fp32_path, candidate, keep)
    # the converter's casts of the graph's inputs and outputs stand for them (where they remain)
    io = {f"graph_input_cast_{i}": t.name for i, t in enumerate(half.graph.input)}
    io |= {f"graph_output_cast_{i}": t.name for i, t in enumerate(half.graph.output)}
    stored = {io.get(v.name, v.name) for v in half.graph.value_info
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    where, peak = max(((n, p) for n, p in peaks.items() if n in stored), key=lambda item: item[1],
                      default=("", 0.0))
    if peak >= FLOAT16_MAX / HEADROOM:  # an input or output of the graph itself: no node can keep it
        raise QuantizationError(f"float16 cannot hold tensor {where!r}: it reaches {peak:.4g} in the fp32 model, "
                                f"within {HEADROOM}x of float16's largest value {FLOAT16_MAX:g} (a GPU would reach "
                                "infinity); nothing was written. Serve fp32.")
    return {"largest_float16_activation": {"tensor": where, "abs": peak, "float16_max": FLOAT16_MAX},
            "kept_float32": {"nodes": len(keep), "rule": f"reads or writes a tensor >= float16 max / {HEADROOM} "
                                                         "on the gate's inputs", "first": keep[:20]}}


def half_bert(fp32_path: Path, fp16_path: Path, vocab: Path, *, lower_case: bool = True,
              gate: Gate = FP16_GATE) -> QuantizationReport:
    """Write ``fp16_path`` from ``fp32_path`` if it passes ``gate`` on the calibration sentences."""
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".fp16-", dir=fp16_path.parent))
    candidate = scratch / fp16_path.name  # beside its .data file, if it has one
    try:
        sentences = calibration_sentences()
        extra = _fp16_candidate(fp32_path, candidate, calibration_feeds(vocab, lower_case, sentences))
        report = gated_report("fp16", fp32_path, candidate, vocab, lower_case, sentences, gate, start,
                              method=METHOD, extra=extra)
        _promote(scratch, fp16_path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def half_outputs(fp32_path: Path, fp16_path: Path, cases: Sequence[dict[str, np.ndarray]], *,
                 gate: Gate = FP16_GATE, run: Callable | None = None) -> QuantizationReport:
    """``fp16_path`` from ``fp32_path`` (any model), gated on ``cases`` (input feeds): every output row's
    cosine to the fp32 row, and the rank agreement of all their values."""
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=".fp16-", dir=fp16_path.parent))
    candidate = scratch / fp16_path.name
    try:
        extra = _fp16_candidate(fp32_path, candidate, cases)
        run = run or _cpu_run
        cosines, reference_values, half_values = [], [], []
        for feed in cases:
            for ref, got in zip(run(fp32_path, feed), run(candidate, feed), strict=True):
                a = np.asarray(ref, np.float64).reshape(len(ref), -1) if np.ndim(ref) else np.reshape(ref, (1, 1))
                b = np.asarray(got, np.float64).reshape(a.shape)
                norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
                # an all-zero row in both models is a perfect match; in one of them, none at all
                cosines.append(np.where(norms > 0, np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1),
                                        np.where(np.abs(a).sum(1) + np.abs(b).sum(1) == 0, 1.0, 0.0)))
                reference_values.append(a.ravel())
                half_values.append(b.ravel())
        cosine = np.concatenate(cosines)
        rank = _spearman(np.concatenate(reference_values), np.concatenate(half_values))
        report = QuantizationReport("fp16", len(cosine), float(cosine.min()), float(cosine.mean()), rank, gate,
                                    fp32_path.stat().st_size / 1e6, candidate.stat().st_size / 1e6,
                                    round(time.perf_counter() - start, 2), METHOD, samples="output rows",
                                    extra=extra)
        judge(report, "output rows of the export check")
        _promote(scratch, fp16_path.parent)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _promote(scratch: Path, folder: Path) -> None:
    for file in scratch.iterdir():  # model.onnx, and model.onnx.data past 2 GB
        file.replace(folder / file.name)


def _cpu_run(path: Path, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feed.items() if k in wanted})
