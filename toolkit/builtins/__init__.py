"""Built-in hooks a spec can name instead of writing its own, e.g. ``toolkit.builtins.text:WordPieceTokenizer``.

    text.WordPieceTokenizer   TEXT (BYTES) -> input_ids / attention_mask / token_type_ids (INT64)
    text.MeanPooling          last_hidden_state + attention_mask (or pooler_output) -> embedding (FP32)
    image.ImagePreprocess     IMAGE (encoded JPEG/PNG BYTES) -> image (FP32 NHWC in [-1, 1])

Each module documents its tensors, its config ``parameters`` and the numeric error codes its
``api_entry`` sends (1000-1099 text, 1100-1199 image, 1200-1299 pooling). The submodules are not
imported here so that a model using only one of them does not pay for the other's imports; this
module holds only the parameter parsing they share.

Stub side (``toolkit.runtime.STUB_SIDE``): imports ``toolkit.runtime`` and ``toolkit.builtins`` only,
and stays Python 3.10 compatible (ruff.toml here checks it).
"""

from __future__ import annotations

from typing import Any


def parse_bool(value: Any, name: str) -> bool:
    """Config parameters arrive as strings; accept the usual spellings and nothing else."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"parameter {name!r} must be true or false, got {value!r}")


def parse_int(value: Any, name: str, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"parameter {name!r} must be >= {minimum}, got {number}")
    return number


def column_tensor(request: dict, name: str, code: int):
    """The request's ``name`` tensor, which must be shaped [n, 1] with n >= 1 (one item per row)."""
    from toolkit.runtime.hooks import HookError

    tensor = request.get(name)
    if tensor is None:
        raise HookError(code, f"request has no {name} tensor")
    shape = getattr(tensor, "shape", None)
    if shape is None or len(shape) != 2 or shape[1] != 1 or shape[0] < 1:
        raise HookError(code, f"{name} must have shape [n, 1] with n >= 1, got {shape}")
    return tensor
