"""Fold a converted graph whose weights were traced as inputs into the graph freezing would give.

A Keras model is traced with its weights as function inputs (``keras_models._convert_stateless``) so
that tf2onnx never holds them: freezing them as constants made VGG16's export peak at 17.4 GB. The
price is a graph tf2onnx could not simplify: BatchNorm left as Sub/Sqrt/Reciprocal/Mul/Add chains
on the weights, a Transpose on every convolution's kernel and the NHWC layout kept around each
layer (MobileNetV2: 694 nodes, 156 Transposes, a ReduceMean for the pooling).

Once the weights are bound as initializers those chains are constants, and two well-kept optimizers
finish the job on the written file:

1. onnxruntime at ``ORT_ENABLE_BASIC``, saved offline (``optimized_model_filepath``): constant
   folding, the kernels' Transposes, BatchNorm folded into the convolutions. Basic-level rewrites are
   standard ONNX ops only, the same on every machine.
2. tf2onnx's own optimizer (``GraphUtil.optimize_model_proto``): pushes the NHWC Transposes through
   the graph until they cancel, and a spatial mean becomes a GlobalAveragePool - what it does to a
   frozen graph during conversion.

MobileNetV2 then has 100 nodes and 1 Transpose (the frozen export: 138 and 1). The folded file is
what the export checks against the source, unoptimized and as served; ``fold_file`` leaves the file
untouched when either optimizer fails, and the exporter keeps the unfolded file when the folded one
does not pass its check.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import onnx

from toolkit.errors import first_line
from toolkit.export import memory, onnx_check

log = logging.getLogger(__name__)

#: onnxruntime rewrites never applied offline: ``Pad_Fusion`` (1.31) folds a ResNetV2 stem's zero
#: padding into its max-pool and changes the answers. The served path finds such rewrites itself
#: (verify.py); the file must stay right with every optimization off.
UNSAFE_OFFLINE = ("Pad_Fusion",)


def fold_file(path: Path) -> bool:
    """Rewrite the ONNX file at ``path`` (and its ``.data``) folded; False, and the file untouched,
    when either optimizer fails on it (the reason goes to the log)."""
    path = Path(path)
    scratch = path.with_name(f"{path.stem}.folding")
    scratch.mkdir(exist_ok=True)
    try:
        folded = _fold_with_onnxruntime(path, scratch / "model.onnx")
        memory.release()
        model = onnx.load(str(folded))  # loads external data too
        before = len(model.graph.node)
        optimized, held = _push_transposes(model)
        _prune_opset_imports(optimized)
        log.info("folded %s: %d nodes after onnxruntime, %d after tf2onnx's optimizer", path.name, before,
                 len(optimized.graph.node))
        onnx_check.write_onnx(optimized, scratch / "final.onnx", held)  # the weights written from ``model``
        del model, optimized, held
        memory.release()
        onnx_check.check_file(scratch / "final.onnx")
    except Exception as e:  # an optimizer bug must not fail an export whose unfolded file is right
        log.warning("graph folding failed, keeping the unfolded file: %s: %s", type(e).__name__, first_line(e))
        shutil.rmtree(scratch, ignore_errors=True)
        return False
    data = path.with_name(f"{path.name}.data")
    data.unlink(missing_ok=True)
    (scratch / "final.onnx").replace(path)
    if (scratch / "final.onnx.data").exists():
        (scratch / "final.onnx.data").replace(data)
        _relocate_external_data(path, data.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return True


def _fold_with_onnxruntime(source: Path, target: Path) -> Path:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    if source.with_name(f"{source.name}.data").exists():  # past protobuf's 2 GB: keep the weights outside
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         f"{target.name}.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                         "1024")
    session = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(UNSAFE_OFFLINE))
    del session
    return target


#: Initializers this large are weights (a BatchNorm's per-channel vectors are a few KB) and are held
#: out of tf2onnx's optimizer as graph inputs: it copies every constant it looks at, and VGG16's
#: 553 MB went past 10 GB in it. Its rewrites only need the small ones (a Mul's scale, shapes, pads).
HOLD_OUT_BYTES = 256 * 1024


def _push_transposes(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """tf2onnx's optimizer on ``model`` without its large weights: the optimized model, and the
    weights (``model``'s own tensors, not copies) that it still reads, to be written beside it."""
    from tf2onnx.graph import GraphUtil
    graph = model.graph
    held = {t.name: i for i, t in enumerate(graph.initializer) if onnx_check.tensor_bytes(t) >= HOLD_OUT_BYTES}
    light = onnx_check.copy_without(model, "graph")
    light.graph.CopyFrom(onnx_check.copy_without(graph, "initializer"))
    light.graph.initializer.extend(t for t in graph.initializer if t.name not in held)
    light.graph.input.extend(onnx.helper.make_tensor_value_info(graph.initializer[i].name,
                                                                graph.initializer[i].data_type,
                                                                list(graph.initializer[i].dims))
                             for i in held.values())
    optimized = GraphUtil.optimize_model_proto(light)
    del light
    used = {name for node in optimized.graph.node for name in node.input}
    kept = [i for i in optimized.graph.input if i.name not in held]
    del optimized.graph.input[:]
    optimized.graph.input.extend(kept)
    return optimized, [graph.initializer[i] for name, i in held.items() if name in used]


def _prune_opset_imports(model: onnx.ModelProto) -> None:
    """onnxruntime's saved model imports every domain it knows (com.microsoft, ...); keep the used ones."""
    used = {node.domain for node in model.graph.node} | {""}
    kept = [o for o in model.opset_import if o.domain in used]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _relocate_external_data(path: Path, location: str) -> None:
    """Point the external tensors of ``path`` at ``location`` (the data file was renamed)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(path))
