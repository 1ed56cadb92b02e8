"""What tf2onnx 1.17 cannot take from Keras 3 / TensorFlow 2.21 as they are, and how it is made to.

Each fix keeps the model's arithmetic; the export check then compares the ONNX with the untouched
source model, so a fix that changed a result would fail the export.

* Grouped convolutions (ConvNeXt's depthwise-as-grouped ``Conv2D(groups=C)``). Keras' TensorFlow
  backend wraps them in a ``tf.function(jit_compile=True)`` because TensorFlow's CPU kernels cannot
  run them; tf2onnx cannot look inside an XLA-compiled call and leaves a ``PartitionedCall``.
  While an export traces the model (``traceable_keras``), the plain ``Conv2D`` op is emitted
  instead: tf2onnx converts it to an ONNX ``Conv`` with ``group``. Nothing is executed by
  TensorFlow in that graph, so its CPU limitation does not matter.
* ``Erfc`` (the exact GELU, ``0.5 x erfc(-x/sqrt 2)``; ConvNeXt, ViT-like user models): tf2onnx
  has no handler; it becomes ``1 - Erf(x)`` (registered once, on import).
* Constants captured by the traced function (Keras 3 ``Normalization`` keeps its mean and variance
  as eager tensors; every EfficientNet and EfficientNetV2 has one): tf2onnx's ``from_function``
  turns them into graph *inputs* (``.../normalization_1/Sub/y:0``) that nobody can feed.
  ``captured_constants`` reads their values so the converter binds them as initializers.
* Memory: ``tf.custom_gradient`` traced into a graph (Keras' swish in every EfficientNet, users'
  layers) registers its gradient under a fresh name in TensorFlow's process-wide gradient registry,
  whose closure keeps the traced graph, and every variable the graph captured, alive until the
  process ends. ``released_gradients`` drops those registrations: an export never differentiates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import tensorflow as tf
from tf2onnx import utils as tf2onnx_utils
from tf2onnx.handler import tf_op


@tf_op("Erfc")
class _Erfc:
    """erfc(x) = 1 - erf(x); ONNX has Erf since opset 9."""

    @classmethod
    def version_9(cls, ctx, node, **kwargs):
        node.type = "Erf"
        dtype = ctx.get_dtype(node.output[0])
        one = ctx.make_const(tf2onnx_utils.make_name(f"{node.name}_one"),
                             np.array(1, dtype=tf2onnx_utils.map_onnx_to_numpy_type(dtype)))
        sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=tf2onnx_utils.make_name(f"{node.name}_erfc"))
        ctx.replace_inputs(sub, [one.output[0], node.output[0]])


@contextlib.contextmanager
def traceable_keras() -> Iterator[None]:
    """While tracing for export: grouped convolutions as plain Conv2D ops instead of XLA calls."""
    from keras.src import backend
    from keras.src.backend.tensorflow import nn as tf_nn

    original = tf_nn.conv

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = backend.standardize_data_format(data_format)
        channels = inputs.shape[-1] if data_format == "channels_last" else inputs.shape[1]
        if channels == kernel.shape[-2] or data_format != "channels_last":
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(),
                                 data_format=tf_nn._convert_data_format(data_format, len(inputs.shape)),
                                 dilations=dilation_rate)

    tf_nn.conv = conv
    try:
        yield
    finally:
        tf_nn.conv = original


_CUSTOM_GRADIENT = "CustomGradient-"


@contextlib.contextmanager
def released_gradients() -> Iterator[None]:
    """Forget the custom gradients registered while tracing inside this block, so that the traced
    graphs can be freed with their functions (EfficientNetB7's reference graph kept its 0.25 GB of
    weights alive after the model was gone)."""
    from tensorflow.python.framework import ops

    registry = ops.gradient_registry._registry  # no public way to unregister
    before = set(registry)
    try:
        yield
    finally:
        for name in [n for n in registry if n not in before and n.startswith(_CUSTOM_GRADIENT)]:
            del registry[name]


def captured_constants(concrete: tf.types.experimental.ConcreteFunction) -> dict[str, np.ndarray]:
    """Placeholder name (as tf2onnx names the ONNX input, ``.../Sub/y:0``) -> value, for every eager
    tensor the function captured. Resource captures (variables) are left to tf2onnx, which freezes them."""
    constants = {}
    for external, internal in concrete.graph.captures:
        if external.dtype != tf.resource and hasattr(external, "numpy"):
            constants[internal.name] = np.asarray(external.numpy())
    return constants
