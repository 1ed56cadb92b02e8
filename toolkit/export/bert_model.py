"""A BERT encoder in TensorFlow/Keras whose weights are named as in google-research/bert.

The Keras model is the reference the ONNX file is checked against, so it is written out plainly:
explicit weights keyed by the original checkpoint names (``bert/encoder/layer_0/attention/self/
query/kernel``), the arithmetic of ``modeling.py`` (exact erf GELU, LayerNorm with the config's
epsilon, additive -10000 attention mask), and nothing else (no dropout: inference only).

Each piece is spelled the way onnxruntime's fusions look for it (the ONNX file stays plain ONNX):
LayerNorm as ``(x - mean) / sqrt(mean((x - mean)^2) + eps)``, which onnxruntime's own session fuses
into ``LayerNormalization`` (BENCHMARKS.md, "Routes to the roofline"); the attention scores divided
by sqrt(head size) and the mask unsqueezed before its cast, the shapes its transformer optimizer
(``onnxruntime.transformers.optimizer``) needs to fuse ``Attention``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np
import onnx
import onnx.numpy_helper
import tensorflow as tf

from toolkit.errors import ExportError
from toolkit.export.defaults import DEFAULT_OPSET
from toolkit.export.onnx_check import convert_function

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
LAST_HIDDEN_STATE = "last_hidden_state"
POOLER_OUTPUT = "pooler_output"

_ACTIVATIONS = {
    # BERT's "gelu" is the exact erf form (modeling.py, and HF's ACT2FN["gelu"]).
    "gelu": lambda x: 0.5 * x * (1.0 + tf.math.erf(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))),
    "gelu_pytorch_tanh": lambda x: 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x))),
    "relu": tf.nn.relu,
}


@dataclass(frozen=True)
class BertConfig:
    """The fields of ``bert_config.json`` / HF ``config.json`` that decide the graph and the shapes."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str) -> BertConfig:
        """Validate a config dict; ``source`` (the file) is named in every error."""
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size"]
        missing = [k for k in required if k not in data]
        if missing:
            raise ExportError(f"{source}: missing BERT config field(s): {', '.join(missing)}")
        try:
            config = cls(**{k: int(data[k]) for k in required},
                         hidden_act=str(data.get("hidden_act", "gelu")),
                         layer_norm_eps=float(data.get("layer_norm_eps", 1e-12)))
        except (TypeError, ValueError) as e:
            raise ExportError(f"{source}: a BERT config field has a wrong type: {e}") from e
        problems = []
        if config.hidden_act not in _ACTIVATIONS:
            problems.append(f"hidden_act '{config.hidden_act}' is not supported ({', '.join(_ACTIVATIONS)})")
        if config.hidden_size % config.num_attention_heads:
            problems.append(f"hidden_size {config.hidden_size} is not a multiple of "
                            f"num_attention_heads {config.num_attention_heads}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            problems.append(f"position_embedding_type '{data['position_embedding_type']}' is not supported "
                            "(only 'absolute', as in the original BERT)")
        if data.get("model_type", "bert") != "bert":
            problems.append(f"model_type '{data['model_type']}' is not 'bert'")
        if problems:
            raise ExportError(f"{source}: " + "; ".join(problems))
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bert_weight_shapes(config: BertConfig, with_pooler: bool = True) -> dict[str, tuple[int, ...]]:
    """Every weight the encoder needs, by its google-research/bert name, with its shape.

    Dense kernels are [in, out] as TensorFlow stores them.
    """
    h, i = config.hidden_size, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "bert/embeddings/word_embeddings": (config.vocab_size, h),
        "bert/embeddings/token_type_embeddings": (config.type_vocab_size, h),
        "bert/embeddings/position_embeddings": (config.max_position_embeddings, h),
        "bert/embeddings/LayerNorm/gamma": (h,),
        "bert/embeddings/LayerNorm/beta": (h,),
    }
    for n in range(config.num_hidden_layers):
        p = f"bert/encoder/layer_{n}"
        for dense, (fan_in, fan_out) in {
            "attention/self/query": (h, h), "attention/self/key": (h, h), "attention/self/value": (h, h),
            "attention/output/dense": (h, h), "intermediate/dense": (h, i), "output/dense": (i, h),
        }.items():
            shapes[f"{p}/{dense}/kernel"] = (fan_in, fan_out)
            shapes[f"{p}/{dense}/bias"] = (fan_out,)
        for norm in ("attention/output/LayerNorm", "output/LayerNorm"):
            shapes[f"{p}/{norm}/gamma"] = (h,)
            shapes[f"{p}/{norm}/beta"] = (h,)
    if with_pooler:
        shapes["bert/pooler/dense/kernel"] = (h, h)
        shapes["bert/pooler/dense/bias"] = (h,)
    return shapes


class BertEncoder(keras.layers.Layer):
    """BERT embeddings + transformer layers (+ pooler) over the three int64 [batch, seq] inputs."""

    def __init__(self, config: BertConfig, with_pooler: bool = True, **kwargs: Any):
        super().__init__(name=kwargs.pop("name", "bert"), **kwargs)
        self.config, self.with_pooler = config, with_pooler
        self.bert_weights = {
            name: self.add_weight(name=name.replace("/", "."), shape=shape, initializer="zeros",
                                  trainable=False)
            for name, shape in bert_weight_shapes(config, with_pooler).items()
        }
        self.built = True

    def set_bert_weights(self, arrays: dict[str, np.ndarray]) -> None:
        """Assign arrays by google-research/bert name; shapes were checked by ``match_weights``."""
        for name, variable in self.bert_weights.items():
            variable.assign(arrays[name])

    def call(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return bert_forward(self.bert_weights, self.config, inputs, self.with_pooler)


def bert_forward(weights: Mapping[str, tf.Tensor], config: BertConfig, inputs: Mapping[str, tf.Tensor],
                 with_pooler: bool = True) -> dict[str, tf.Tensor]:
    """The encoder as a function of its weights, so the same arithmetic runs on Keras variables
    (the reference) and on graph inputs (what tf2onnx converts; see ``export_bert``)."""
    input_ids = inputs["input_ids"]
    seq_len = tf.shape(input_ids)[1]
    x = (tf.gather(weights["bert/embeddings/word_embeddings"], input_ids)
         + tf.gather(weights["bert/embeddings/token_type_embeddings"], inputs["token_type_ids"])
         + weights["bert/embeddings/position_embeddings"][tf.newaxis, :seq_len, :])
    x = _layer_norm(weights, x, "bert/embeddings/LayerNorm", config.layer_norm_eps)
    mask = tf.expand_dims(tf.expand_dims(inputs["attention_mask"], 1), 1)  # [batch, 1, 1, seq]
    additive_mask = (1.0 - tf.cast(mask, x.dtype)) * -10000.0
    for n in range(config.num_hidden_layers):
        x = _transformer_layer(weights, config, x, additive_mask, f"bert/encoder/layer_{n}")
    outputs = {LAST_HIDDEN_STATE: x}
    if with_pooler:
        outputs[POOLER_OUTPUT] = tf.tanh(_dense(weights, x[:, 0], "bert/pooler/dense"))
    return outputs


def _dense(weights: Mapping[str, tf.Tensor], x: tf.Tensor, prefix: str) -> tf.Tensor:
    return tf.matmul(x, weights[f"{prefix}/kernel"]) + weights[f"{prefix}/bias"]


def _layer_norm(weights: Mapping[str, tf.Tensor], x: tf.Tensor, prefix: str, eps: float) -> tf.Tensor:
    centered = x - tf.reduce_mean(x, axis=-1, keepdims=True)
    variance = tf.reduce_mean(tf.pow(centered, 2.0), axis=-1, keepdims=True)
    normed = centered / tf.sqrt(variance + eps)
    return normed * weights[f"{prefix}/gamma"] + weights[f"{prefix}/beta"]


def _transformer_layer(weights: Mapping[str, tf.Tensor], config: BertConfig, x: tf.Tensor,
                       additive_mask: tf.Tensor, prefix: str) -> tf.Tensor:
    heads = config.num_attention_heads
    head_size = config.hidden_size // heads
    batch, seq = tf.shape(x)[0], tf.shape(x)[1]

    def split_heads(t: tf.Tensor) -> tf.Tensor:  # [b, s, h] -> [b, heads, s, head_size]
        return tf.transpose(tf.reshape(t, [batch, seq, heads, head_size]), [0, 2, 1, 3])

    q = split_heads(_dense(weights, x, f"{prefix}/attention/self/query"))
    k = split_heads(_dense(weights, x, f"{prefix}/attention/self/key"))
    v = split_heads(_dense(weights, x, f"{prefix}/attention/self/value"))
    scores = tf.matmul(q, k, transpose_b=True) / math.sqrt(head_size) + additive_mask
    context = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
    context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [batch, seq, config.hidden_size])
    attention = _layer_norm(weights, _dense(weights, context, f"{prefix}/attention/output/dense") + x,
                            f"{prefix}/attention/output/LayerNorm", config.layer_norm_eps)
    intermediate = _ACTIVATIONS[config.hidden_act](_dense(weights, attention, f"{prefix}/intermediate/dense"))
    return _layer_norm(weights, _dense(weights, intermediate, f"{prefix}/output/dense") + attention,
                       f"{prefix}/output/LayerNorm", config.layer_norm_eps)


def build_bert_model(config: BertConfig, weights: dict[str, np.ndarray] | None = None,
                     with_pooler: bool = True) -> keras.Model:
    """A functional Keras model with inputs ``input_ids``/``attention_mask``/``token_type_ids``
    (int64 [batch, seq]) and a dict output ``last_hidden_state`` [batch, seq, hidden]
    (+ ``pooler_output`` [batch, hidden])."""
    inputs = {name: keras.Input(shape=(None,), dtype="int64", name=name) for name in INPUT_NAMES}
    encoder = BertEncoder(config, with_pooler=with_pooler)
    if weights is not None:
        encoder.set_bert_weights(weights)
    return keras.Model(inputs=inputs, outputs=encoder(inputs), name="bert")


def convert_bert_to_onnx(config: BertConfig, weights: dict[str, np.ndarray], with_pooler: bool = True,
                         opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """tf2onnx conversion of ``bert_forward`` with dynamic batch and sequence axes.

    The converted function takes the weights as inputs, which are then bound as ONNX initializers
    named as in the checkpoint (``bert/encoder/layer_0/...``): tf2onnx never copies the weights
    around, which keeps a BERT-base conversion under 4 GB of memory (see ``onnx_check``).
    """
    token_specs = [tf.TensorSpec([None, None], tf.int64, name=name) for name in INPUT_NAMES]
    weight_specs = [tf.TensorSpec(array.shape, tf.float32, name=name) for name, array in weights.items()]

    @tf.function(input_signature=token_specs + weight_specs)
    def serve(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        tokens = dict(zip(INPUT_NAMES, args[:len(INPUT_NAMES)], strict=True))
        bound = dict(zip(weights, args[len(INPUT_NAMES):], strict=True))
        return bert_forward(bound, config, tokens, with_pooler)

    dims: dict[str, list[str | None]] = {name: ["batch", "sequence"] for name in INPUT_NAMES}
    dims |= {LAST_HIDDEN_STATE: ["batch", "sequence"], POOLER_OUTPUT: ["batch"]}
    model = convert_function(serve, token_specs + weight_specs, opset=opset, dim_names=dims, initializers=weights)
    restore_reduce_mean(model, opset)
    return model


def restore_reduce_mean(model: onnx.ModelProto, opset: int) -> None:
    """Turn tf2onnx's ``GlobalAveragePool`` back into the ``ReduceMean`` over the last axis it was.

    tf2onnx rewrites a mean over the last axis of a rank-3 tensor as a global average pool (the same
    numbers), which hides every LayerNorm from onnxruntime's ``LayerNormFusion``. In this graph
    every such pool is a LayerNorm's mean over the hidden axis of a [batch, sequence, hidden] tensor."""
    axes_name = "toolkit_reduce_last_axis"
    for node in model.graph.node:
        if node.op_type != "GlobalAveragePool":
            continue
        node.op_type = "ReduceMean"
        node.attribute.append(onnx.helper.make_attribute("keepdims", 1))
        if opset >= 18:  # axes became an input in opset 18
            node.input.append(axes_name)
        else:
            node.attribute.append(onnx.helper.make_attribute("axes", [-1]))
    if opset >= 18 and any(axes_name in node.input for node in model.graph.node):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), axes_name))
