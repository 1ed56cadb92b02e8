"""perf_analyzer's ``--input-data`` JSON, made from a generated model's config and export.

perf_analyzer's own random data is wrong for most of our models: random bytes are neither text nor an
image, and random int64 token ids fall outside a BERT's vocabulary (every request then fails with
1301). This module reads what the served model declares and makes data it accepts:

    BYTES   the bench's sentences (a text input) or its JPEG images (an image input: a step whose hook
            is an image hook, or an input named like one), the same payloads `toolkit bench load` sends
    INT*    values drawn in the input's declared range (export.json, ``input_range.NAME`` parameters:
            the ranges the ONNX hook enforces)
    FP*     finite values in [-1, 1)

Shapes come from the config's dims; a variable dim takes the user's ``--shape NAME:d1,d2`` (perf_analyzer's
own spelling), the size given to the dim of the same name on another input (export.json's dim names), or
``default_dim``. Each entry of ``data`` is one request; perf_analyzer cycles through them.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.errors import BenchError

IMAGE_HOOK_MODULES = ("toolkit.builtins.image",)
IMAGE_NAMES = ("image", "img", "picture", "photo", "jpeg", "png")
#: How many distinct requests the JSON holds for non-BYTES inputs (BYTES: the whole corpus / 64 images).
NUMERIC_ENTRIES = 16
INT_TYPES = {"TYPE_INT8": "int8", "TYPE_INT16": "int16", "TYPE_INT32": "int32", "TYPE_INT64": "int64",
             "TYPE_UINT8": "uint8", "TYPE_UINT16": "uint16", "TYPE_UINT32": "uint32", "TYPE_UINT64": "uint64"}
FLOAT_TYPES = {"TYPE_FP16", "TYPE_FP32", "TYPE_FP64"}


@dataclass
class InputData:
    """The JSON perf_analyzer reads, and one line per input saying what it holds."""

    data: dict
    notes: list[str] = field(default_factory=list)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.data), encoding="utf-8")
        return path


def read_config(repository: Path, model: str):
    """The generated ``config.pbtxt`` parsed by Triton's own ModelConfig protobuf."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / model / "config.pbtxt"
    if not path.is_file():
        raise BenchError(f"{path} not found: is {model!r} a model of the repository the server serves? "
                         "(toolkit gen-repo writes it; --repository chooses another)")
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except text_format.ParseError as e:
        raise BenchError(f"{path}: not a Triton model config ({e})") from e


def input_data(repository: Path, model: str, shapes: dict[str, list[int]] | None = None, default_dim: int = 16,
               seed: int = 0) -> InputData:
    """Requests ``model`` accepts, from the generated repository's config and version folders."""
    from toolkit.bench.pipelines import load_corpus, make_images
    from toolkit.runtime.onnx_hook import declared_ranges
    from toolkit.runtime.params import read_export

    shapes = dict(shapes or {})
    config = read_config(repository, model)
    names = [i.name for i in config.input]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise BenchError(f"--shape names {unknown}, not inputs of {model!r} ({', '.join(names)})")
    export = read_export(_version_dir(Path(repository) / model))
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    try:
        ranges = declared_ranges(export, parameters, names)
    except ValueError as e:
        raise BenchError(f"{model}: {e}") from e
    labels = _dim_labels(export, batched=config.max_batch_size > 0)
    sizes = {label: size for name, shape in shapes.items() for label, size in zip(labels.get(name, []), shape,
                                                                                   strict=False) if label}
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {}
    notes = []
    for spec in config.input:
        dtype = _type_name(spec.data_type)
        shape = _shape(spec.name, list(spec.dims), shapes.get(spec.name), default_dim, labels.get(spec.name), sizes)
        if dtype == "TYPE_STRING":
            kind = _bytes_kind(Path(repository), config, spec.name)
            if kind == "image":
                images = make_images(64, seed=seed)
                columns[spec.name] = [_b64_bytes_tensor([image] * _count(shape)) | {"shape": shape}
                                      for image in images]
                notes.append(f"{spec.name}: {len(images)} JPEG images (224x224), shape {shape}")
            else:
                texts = load_corpus()
                columns[spec.name] = [{"content": [text] * _count(shape), "shape": shape} for text in texts]
                notes.append(f"{spec.name}: {len(texts)} sentences of toolkit/bench/data/sentences.txt, "
                             f"shape {shape}")
        elif dtype in INT_TYPES:
            lo, hi = ranges.get(spec.name, (0, 1))
            columns[spec.name] = [{"content": rng.integers(lo, hi, size=_count(shape)).tolist(), "shape": shape}
                                  for _ in range(NUMERIC_ENTRIES)]
            notes.append(f"{spec.name}: {dtype[5:]} in [{lo}, {hi}), shape {shape}" if spec.name in ranges else
                         f"{spec.name}: {dtype[5:]} zeros (no declared range: export.json or an "
                         f"input_range.{spec.name} parameter gives one), shape {shape}")
        elif dtype in FLOAT_TYPES:
            columns[spec.name] = [{"content": rng.uniform(-1, 1, size=_count(shape)).round(6).tolist(),
                                   "shape": shape} for _ in range(NUMERIC_ENTRIES)]
            notes.append(f"{spec.name}: {dtype[5:]} in [-1, 1), shape {shape}")
        elif dtype == "TYPE_BOOL":
            columns[spec.name] = [{"content": rng.integers(0, 2, size=_count(shape)).astype(bool).tolist(),
                                   "shape": shape} for _ in range(NUMERIC_ENTRIES)]
            notes.append(f"{spec.name}: BOOL, shape {shape}")
        else:
            raise BenchError(f"{model}: input {spec.name!r} has type {dtype}, which bench perf cannot make "
                             "data for: give perf_analyzer your own --input-data FILE")
    entries = max(len(c) for c in columns.values())
    data = [{name: column[i % len(column)] for name, column in columns.items()} for i in range(entries)]
    return InputData({"data": data}, notes)


def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(data_type)


def _version_dir(model_dir: Path) -> Path:
    """The newest numbered version folder (what `latest: 1` serves); the model folder when there is none."""
    versions = sorted((int(p.name), p) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()) \
        if model_dir.is_dir() else []
    return versions[-1][1] if versions else model_dir


def _dim_labels(export: dict, batched: bool) -> dict[str, list[str]]:
    """Each input's dim names without the batch dim (export.json: a BERT's three inputs share 'sequence')."""
    labels = {}
    for tensor in export.get("inputs") or []:
        if isinstance(tensor, dict) and isinstance(tensor.get("dim_names"), list):
            labels[tensor.get("name")] = [str(n) if n else "" for n in tensor["dim_names"][1 if batched else 0:]]
    return labels


def _shape(name: str, dims: list[int], given: list[int] | None, default_dim: int, labels: list[str] | None,
           sizes: dict[str, int]) -> list[int]:
    """The concrete shape: the user's --shape, else each variable dim the size the user gave a dim of the same
    name on another input (inputs that share a dim must agree, or the hook answers 1304), else ``default_dim``."""
    if given is not None:
        fits = len(given) == len(dims) and all(d in (-1, g) for d, g in zip(dims, given, strict=True))
        if not fits or min(given, default=1) < 1:
            raise BenchError(f"--shape {name}:{','.join(map(str, given))} does not fit its dims {dims} "
                             "(without the batch dim; -1 is variable)")
        return list(given)
    labels = labels if labels and len(labels) == len(dims) else [""] * len(dims)
    return [sizes.get(label, default_dim) if d == -1 else d for d, label in zip(dims, labels, strict=True)]


def _count(shape: list[int]) -> int:
    return int(np.prod(shape)) if shape else 1


def _b64_bytes_tensor(items: list[bytes]) -> dict:
    """A BYTES tensor for perf_analyzer's ``b64`` form: the raw tensor, each element 4-byte length-prefixed
    (little endian) as Triton serializes strings; plain base64 of the file fails with a bad length."""
    raw = b"".join(struct.pack("<I", len(item)) + item for item in items)
    return {"b64": base64.b64encode(raw).decode("ascii")}


def _bytes_kind(repository: Path, config, name: str, depth: int = 0) -> str:
    """``image`` when the input feeds an image hook (through an ensemble's steps too) or is named like an
    image, else ``text``."""
    hook = config.parameters["toolkit.hook"].string_value if "toolkit.hook" in config.parameters else ""
    if hook.partition(":")[0] in IMAGE_HOOK_MODULES:
        return "image"
    if config.platform == "ensemble" and depth < 8:
        for step in config.ensemble_scheduling.step:
            for step_input, tensor in step.input_map.items():
                if tensor == name and (repository / step.model_name / "config.pbtxt").is_file():
                    return _bytes_kind(repository, read_config(repository, step.model_name), step_input, depth + 1)
    return "image" if any(word in name.lower() for word in IMAGE_NAMES) else "text"
