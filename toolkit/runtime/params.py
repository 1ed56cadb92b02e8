"""Config ``parameters`` keys the toolkit reserves for itself; written by gen-repo, read by the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RESERVED = "toolkit."

HOOK = "toolkit.hook"
API_PATH = "toolkit.api_path"
PAD_PREFIX = "toolkit.pad."
TRIM_PREFIX = "toolkit.trim."
#: The built-in hook that runs an ONNX file with onnxruntime on the embedded (python-only) server.
ONNX_HOOK = "toolkit.runtime.onnx_hook:OnnxModel"
BUCKET_COST = "toolkit.bucket_cost"
BUCKET_ROWS = "toolkit.bucket_rows"
#: ``execution: fused``: the version folder's file that lists the steps the adapter runs in one process.
FUSED = "toolkit.fused"


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """A model config's ``parameters`` (as Triton hands the config to ``initialize``) as plain strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def hook_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """What a hook's ``init`` sees: every parameter except the toolkit's own."""
    return {k: v for k, v in params.items() if not k.startswith(RESERVED)}
