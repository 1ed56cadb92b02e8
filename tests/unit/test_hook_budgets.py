"""Per-request budgets and input checks of the built-in hooks: the pixel and byte budgets that keep
one request from holding an instance, BERT's token-id ranges, non-finite inputs. Each is one clear
code, raised in api_entry before any heavy work (the image budget reads headers only)."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from test_builtins_text import TINY_VOCAB, text_request
from test_builtins_text import make_hook as make_text_hook

from toolkit.builtins.image import ImagePreprocess
from toolkit.builtins.text import MeanPooling, WordPieceTokenizer
from toolkit.hooks import HookContext, HookError


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_hook(tmp_path, **params) -> ImagePreprocess:
    hook = ImagePreprocess()
    hook.init(HookContext("preprocess", 1, tmp_path, parameters=params))
    return hook


def test_many_large_images_in_one_request_are_refused_from_their_headers_fast(tmp_path):
    hook = image_hook(tmp_path, max_request_pixels="50000000")
    big = png(6000, 6000)                     # 36 MP each, ~100 KB compressed: under the per-image limit
    request = {"IMAGE": np.array([[big]] * 4, dtype=object)}
    started = time.perf_counter()
    with pytest.raises(HookError) as refused:
        hook.api_entry(request)
    took = time.perf_counter() - started
    assert refused.value.code == 1105 and "50 megapixels" in refused.value.message
    assert took < 1.0, took                   # decoding them would take seconds
    one = hook.api_entry({"IMAGE": np.array([[png(64, 48)]], dtype=object)})
    assert one["image"].shape == (1, 224, 224, 3)


def test_text_byte_budget_per_request_is_1005(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    hook = make_text_hook(WordPieceTokenizer, tmp_path, max_request_bytes="1000")
    with pytest.raises(HookError) as refused:
        hook.api_entry(text_request(*(["hello world " * 10] * 9)))      # 9 x 120 bytes
    assert refused.value.code == 1005 and "1080 bytes" in refused.value.message
    assert hook.api_entry(text_request(*(["hello world " * 10] * 8)))["input_ids"].shape[0] == 8


def test_pooling_refuses_nan_and_a_mask_that_is_not_zeros_and_ones(tmp_path):
    hook = MeanPooling()
    hook.init(HookContext("pooling", 1, tmp_path))
    hidden = np.ones((1, 3, 4), np.float32)
    mask = np.ones((1, 3), np.int64)
    assert hook.api_entry({"last_hidden_state": hidden, "attention_mask": mask})
    with pytest.raises(HookError) as nan:
        hook.api_entry({"last_hidden_state": np.full((1, 3, 4), np.nan, np.float32), "attention_mask": mask})
    with pytest.raises(HookError) as bad_mask:
        hook.api_entry({"last_hidden_state": hidden, "attention_mask": mask * 7})
    assert (nan.value.code, bad_mask.value.code) == (1203, 1204)


@pytest.fixture(scope="module")
def tiny_onnx_bert(tmp_path_factory):
    """A one-Gather "BERT": ids -> embedding rows; export.json declares vocab 10, type vocab 2."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("tiny_bert")
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 2], np.arange(20, dtype=np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [None, None])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, [None, None, 2])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "export.json").write_text(json.dumps({
        "kind": "bert", "vocab_size": 10, "type_vocab_size": 2, "max_position_embeddings": 512,
        "inputs": [{"name": "input_ids", "dtype": "INT64", "shape": [-1, -1], "dim_names": ["batch", "sequence"]}]}))
    return folder


@pytest.mark.parametrize(("ids", "bad"), [([[1, -1]], -1), ([[3, 10]], 10)])
def test_bert_token_ids_outside_the_vocabulary_are_1301(tiny_onnx_bert, ids, bad):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("bert", 1, tiny_onnx_bert))
    with pytest.raises(HookError) as refused:
        hook.api_entry({"input_ids": np.array(ids, np.int64)})
    assert refused.value.code == 1301 and f"holds {bad}, outside [0, 10)" in refused.value.message
    ok = np.array([[0, 9]], np.int64)
    assert hook.api_entry({"input_ids": ok})["input_ids"] is ok
    started = time.perf_counter()
    for _ in range(1000):
        hook.api_entry({"input_ids": np.zeros((1, 256), np.int64)})
    assert (time.perf_counter() - started) / 1000 < 1e-3   # the check stays off the hot path's budget


def test_bert_inputs_longer_than_its_positions_are_1303(tiny_onnx_bert):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("bert", 1, tiny_onnx_bert))
    assert hook.api_entry({"input_ids": np.zeros((2, 512), np.int64)})  # exactly its 512 positions
    with pytest.raises(HookError) as refused:
        hook.api_entry({"input_ids": np.zeros((2, 513), np.int64)})
    assert refused.value.code == 1303
    assert refused.value.message == ("input 'input_ids' holds 513 positions, more than the model's 512: truncate "
                                     "it (the tokenizer's max_seq_length)")


def test_a_declared_range_must_name_an_input_and_be_lo_below_hi(tiny_onnx_bert):
    from toolkit.runtime.onnx_hook import OnnxModel

    for params in ({"input_range.nosuch": "0:5"}, {"input_range.input_ids": "5:5"}, {"input_range.input_ids": "x"}):
        with pytest.raises(ValueError, match="expected 'lo:hi'"):
            OnnxModel().init(HookContext("bert", 1, tiny_onnx_bert, parameters=params))


def test_non_finite_float_inputs_to_an_onnx_model_are_1302(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from toolkit.runtime.onnx_hook import OnnxModel

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "model.onnx")
    hook = OnnxModel()
    hook.init(HookContext("m", 1, tmp_path))
    with pytest.raises(HookError) as refused:
        hook.api_entry({"x": np.array([[1, np.inf, 0]], np.float32)})
    assert refused.value.code == 1302


@pytest.mark.parametrize(("spin", "allow", "stop"), [(None, "0", ""), ("true", "", ""), ("run", "", "1")])
def test_onnx_threads_sleep_unless_told_to_spin(tiny_onnx_bert, spin, allow, stop):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("bert", 1, tiny_onnx_bert, parameters={"spin_threads": spin} if spin else {}))
    options = hook.session.get_session_options()

    def entry(key: str) -> str:  # "" where unset: onnxruntime's default (spinning on, never forced off)
        try:
            return options.get_session_config_entry(key)
        except RuntimeError:  # "does not have configuration with key"
            return ""

    assert (entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")) == (allow, stop)


@pytest.fixture(scope="module")
def two_input_onnx(tmp_path_factory):
    """ids + mask, both [batch, sequence] (the symbolic names BERT exports declare), no export.json:
    the checks come from the graph alone."""
    import onnx
    from onnx import TensorProto, helper

    folder = tmp_path_factory.mktemp("two_inputs")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
         helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["ids_f", "mask_f"], ["y"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    return folder


def test_inputs_that_disagree_on_a_shared_graph_dimension_are_1304(two_input_onnx):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("m", 1, two_input_onnx))
    ids, mask = np.ones((1, 5), np.int64), np.ones((1, 7), np.int64)
    with pytest.raises(Exception, match="Add"):  # what onnxruntime would do with them: its own error
        hook.infer({"input_ids": ids, "attention_mask": mask})
    with pytest.raises(HookError) as refused:
        hook.api_entry({"input_ids": ids, "attention_mask": mask})
    assert refused.value.code == 1304
    assert refused.value.message == ("inputs disagree on dimension 'sequence', which the model shares between "
                                     "them: 'input_ids' 5, 'attention_mask' 7")
    same = {"input_ids": ids, "attention_mask": np.ones((1, 5), np.int64)}
    assert hook.api_entry(same) is same and hook.infer(same)["y"].shape == (1, 5)


def test_an_empty_sequence_is_1305(two_input_onnx):
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext("m", 1, two_input_onnx))
    request = {"input_ids": np.ones((1, 0), np.int64), "attention_mask": np.ones((1, 0), np.int64)}
    with pytest.raises(HookError) as refused:
        hook.api_entry(request)
    assert refused.value.code == 1305
    assert refused.value.message == "input 'input_ids' is empty: 0 entries on its axis 1 ('sequence')"


@pytest.mark.parametrize(("mode", "normalize"), [("mean", "true"), ("mean", "false"), ("cls", "true")])
def test_pooling_finite_states_near_float32_max_give_a_finite_embedding(tmp_path, mode, normalize):
    hook = MeanPooling()
    hook.init(HookContext("pooling", 1, tmp_path, parameters={"mode": mode, "normalize": normalize}))
    hidden = np.full((2, 3, 4), 3e38, np.float32)
    hidden[1] = 1.0                                     # a normal row in the same batch keeps its answer
    hidden[0, :, 1] = -3e38
    mask = np.ones((2, 3), np.int64)
    request = {"last_hidden_state": hidden, "attention_mask": mask}
    with np.errstate(all="raise"):                     # not even a warning on the way
        embedding = hook.infer(hook.api_entry(request))["embedding"]
    assert np.isfinite(embedding).all(), embedding
    if normalize == "true":
        np.testing.assert_allclose(embedding[0], [0.5, -0.5, 0.5, 0.5], rtol=1e-6)
        np.testing.assert_allclose(embedding[1], [0.5] * 4, rtol=1e-6)
    else:
        np.testing.assert_allclose(embedding[0], [3e38, -3e38, 3e38, 3e38], rtol=1e-6)
