"""Read BERT weights from a Google TF checkpoint or a Hugging Face safetensors file, and match them.

Both formats are mapped onto the google-research/bert names the Keras encoder uses. Matching is
strict and complete: every weight that is missing, of the wrong shape, or present but unused
(and not ignored on purpose) is named in one ``WeightError``, in the source's own spelling, so a
wrong config or a checkpoint of another architecture is found in one run.

Ignored on purpose: optimizer slots (``*/adam_m``, ``*/adam_v``), ``global_step``, pretraining heads
(``cls/*``), HF's ``position_ids`` buffer, and the pooler when exporting without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.errors import ExportError, WeightError

GOOGLE_CHECKPOINT = "google-checkpoint"
HF_SAFETENSORS = "huggingface-safetensors"
POOLER_WEIGHTS = ("bert/pooler/dense/kernel", "bert/pooler/dense/bias")

_GOOGLE_IGNORED = re.compile(r"^(cls/.*|global_step|_CHECKPOINTABLE_OBJECT_GRAPH|.*/adam_[mv]|.*/Adam(_1)?)$")
_HF_IGNORED = re.compile(r"^(bert\.)?(embeddings\.position_ids|cls\..*)$")


@dataclass
class WeightSource:
    """Names and shapes of the weights in one file, and how to read one and how to map names.

    ``candidates(google_name)`` gives the source names that may hold that weight (first match wins)
    and whether the stored array is the transpose of TensorFlow's [in, out] kernel.
    """

    format: str
    path: Path
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], np.ndarray]
    candidates: Callable[[str], tuple[list[str], bool]]
    is_ignored: Callable[[str], bool]


@dataclass
class MatchedWeights:
    arrays: dict[str, np.ndarray]
    ignored: list[str] = field(default_factory=list)


def read_google_checkpoint(prefix: Path) -> WeightSource:
    """``prefix`` is the checkpoint path without suffix (``.../bert_model.ckpt``)."""
    import tensorflow as tf

    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes = {name: tuple(shape) for name, shape in reader.get_variable_to_shape_map().items()}
    except Exception as e:  # tf raises NotFoundError/DataLossError/ValueError for bad files
        raise ExportError(f"cannot read TF checkpoint {prefix}: {type(e).__name__}: {e}") from e

    def read(name: str) -> np.ndarray:
        try:
            return np.asarray(reader.get_tensor(name), dtype=np.float32)
        except Exception as e:
            raise ExportError(f"cannot read {name} from TF checkpoint {prefix}: {e}") from e

    return WeightSource(format=GOOGLE_CHECKPOINT, path=prefix, shapes=shapes, read=read,
                        candidates=lambda name: ([name], False),
                        is_ignored=lambda name: bool(_GOOGLE_IGNORED.match(name)))


def read_hf_safetensors(path: Path) -> WeightSource:
    """A HF ``BertModel`` (or ``BertFor*``, prefixed ``bert.``) ``model.safetensors``, read as numpy."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        # numpy has no bfloat16: safetensors.numpy refuses such files with a TypeError
        raise ExportError(f"cannot read {path} as numpy safetensors: {e}") from e
    prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""

    def candidates(google_name: str) -> tuple[list[str], bool]:
        return [prefix + n for n in _hf_names(google_name)], google_name.endswith("/kernel")

    return WeightSource(format=HF_SAFETENSORS, path=path,
                        shapes={k: tuple(v.shape) for k, v in tensors.items()},
                        read=lambda name: tensors[name].astype(np.float32, copy=False),
                        candidates=candidates, is_ignored=lambda name: bool(_HF_IGNORED.match(name)))


def _hf_names(google_name: str) -> list[str]:
    """``bert/encoder/layer_3/attention/self/query/kernel`` -> ``encoder.layer.3.attention.self.query.weight``.

    LayerNorm gamma/beta are ``weight``/``bias`` in current HF files and ``gamma``/``beta`` in old ones.
    """
    path = re.sub(r"layer_(\d+)", r"layer.\1", google_name.removeprefix("bert/")).replace("/", ".")
    stem, _, last = path.rpartition(".")
    if last == "kernel":
        return [f"{stem}.weight"]
    if last == "gamma":
        return [f"{stem}.weight", f"{stem}.gamma"]
    if last == "beta":
        return [f"{stem}.bias", f"{stem}.beta"]
    if last == "bias":
        return [path]
    return [f"{path}.weight"]  # embedding tables


def match_weights(source: WeightSource, expected: dict[str, tuple[int, ...]],
                  with_pooler: bool = True) -> MatchedWeights:
    """Pick every expected weight out of ``source`` or raise one ``WeightError`` naming all problems."""
    missing: list[str] = []
    wrong_shape: list[str] = []
    used: dict[str, tuple[str, bool]] = {}
    seen: set[str] = set()  # matched by name, whatever the shape: not "unused"
    for google_name, shape in expected.items():
        names, transposed = source.candidates(google_name)
        found = next((n for n in names if n in source.shapes), None)
        if found is None:
            missing.append(names[0])
            continue
        seen.add(found)
        stored_expected = tuple(reversed(shape)) if transposed else shape
        if source.shapes[found] != stored_expected:
            wrong_shape.append(f"{found}: checkpoint has shape {list(source.shapes[found])}, "
                               f"the config expects {list(stored_expected)}")
            continue
        used[google_name] = (found, transposed)

    consumed = seen
    pooler_names = set() if with_pooler else {n for g in POOLER_WEIGHTS for n in source.candidates(g)[0]}
    ignored = sorted(n for n in source.shapes
                     if n not in consumed and (source.is_ignored(n) or n in pooler_names))
    unused = sorted(n for n in source.shapes if n not in consumed and n not in ignored)

    if missing or wrong_shape or unused:
        raise WeightError(_describe_problems(source, missing, wrong_shape, unused, with_pooler))
    arrays = {}
    for google_name, (found, transposed) in used.items():
        array = source.read(found)
        arrays[google_name] = np.ascontiguousarray(array.T) if transposed else array
    return MatchedWeights(arrays=arrays, ignored=ignored)


def _describe_problems(source: WeightSource, missing: list[str], wrong_shape: list[str], unused: list[str],
                       with_pooler: bool) -> str:
    count = len(missing) + len(wrong_shape) + len(unused)
    lines = [f"{source.path} ({source.format}) does not match the BERT config: {count} problem(s)"]
    if missing:
        lines.append(f"missing ({len(missing)}):")
        lines += [f"  {n}" for n in missing]
    if wrong_shape:
        lines.append(f"wrong shape ({len(wrong_shape)}):")
        lines += [f"  {n}" for n in wrong_shape]
    if unused:
        lines.append(f"unused ({len(unused)}), present in the checkpoint but not part of a BERT encoder:")
        lines += [f"  {n} {list(source.shapes[n])}" for n in unused]
    pooler_missing = with_pooler and any(source.candidates(g)[0][0] in missing for g in POOLER_WEIGHTS)
    if pooler_missing:
        lines.append("the checkpoint has no pooler weights, so pooler_output cannot be computed: "
                     "export without it with --no-pooler (export_bert(with_pooler=False))")
    return "\n".join(lines)
