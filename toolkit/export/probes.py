"""Probes: when an output cannot tell a right model from a wrong one, check a layer before it.

An untrained classifier head answers the same (1/1000 for every class) whatever the input, so a
check on it passes for any conversion. For a functional Keras model, the layers feeding such an
output are walked back (breadth first) until one whose output varies across the check inputs by
well more than the tolerance: that tensor becomes an extra output of the model that is converted
and checked (``probe.<layer>``), and is stripped from the file that is written. The probe lives
in the same graph, so checking it checks the operations the served output also runs through.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from toolkit.export import tf_compat
from toolkit.export.verify import CheckCase, discriminates

PREFIX = "probe."
MAX_CANDIDATES = 12


def find_probes(model: keras.Model, output_tensors: dict[str, object], cases: Sequence[CheckCase],
                input_names: Sequence[str], onnx_names: dict[str, str], tolerance: float | None,
                rel_tolerance: float) -> dict[str, tuple[object, str, list[np.ndarray]]]:
    """For each blind output (name -> Keras tensor), a probe: ``{probe name: (tensor, description,
    its outputs per case)}``. Outputs with no discriminating layer within reach get none."""
    try:
        structure = model.input
    except (AttributeError, ValueError):  # a subclassed model has no symbolic graph to walk
        return {}

    specs = [tf.TensorSpec(t.shape, t.dtype) for t in tf.nest.flatten(structure)]

    def evaluate(tensor) -> list[np.ndarray]:
        sub = keras.Model(structure, tensor)
        # in a graph, traced once: Keras' eager call would keep every intermediate tensor alive
        # until the last layer ran (EfficientNetB7 at batch 3: 1.7 GB, 7x its weights)
        run = tf.function(lambda *flat: sub(tf.nest.pack_sequence_as(structure, list(flat)), training=False),
                          input_signature=specs, autograph=False)
        with tf_compat.released_gradients():
            return [np.asarray(run(*[tf.constant(case.inputs[onnx_names[n]]) for n in input_names]))
                    for case in cases]

    model_inputs = {id(t) for t in tf.nest.flatten(structure)}
    probes: dict[str, tuple[object, str, list[np.ndarray]]] = {}
    for tensor in output_tensors.values():
        found = _walk_back(tensor, model_inputs, evaluate, tolerance, rel_tolerance)
        if found is not None:
            probe, layer, values = found
            name = f"{PREFIX}{layer.name}"
            probes.setdefault(name, (probe, f"layer '{layer.name}' ({type(layer).__name__})", values))
    return probes


def _walk_back(tensor, model_inputs: set[int], evaluate: Callable, tolerance, rel_tolerance):
    queue, seen, tried = list(_inbound(tensor)), set(), 0
    while queue and tried < MAX_CANDIDATES:
        candidate = queue.pop(0)
        if id(candidate) in seen or id(candidate) in model_inputs:
            continue
        seen.add(id(candidate))
        if candidate.dtype is not None and not str(candidate.dtype).startswith(("float", "bfloat")):
            continue
        tried += 1
        values = evaluate(candidate)
        if discriminates(values, tolerance, rel_tolerance):
            return candidate, candidate._keras_history.operation, values
        queue.extend(_inbound(candidate))
    return None


def _inbound(tensor) -> list:
    history = getattr(tensor, "_keras_history", None)
    if history is None:
        return []
    operation, node_index = history.operation, history.node_index
    nodes = getattr(operation, "_inbound_nodes", [])
    if node_index >= len(nodes):
        return []
    return [t for t in tf.nest.flatten(nodes[node_index].input_tensors) if hasattr(t, "_keras_history")]
