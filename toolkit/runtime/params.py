"""The gen-repo <-> stub contract: the config ``parameters`` keys the toolkit reserves for itself
(written by gen-repo, read by the adapter), the ONNX hook's thread parameters (checked by gen-repo
with the same function the hook uses), and export.json's serving entry.

numpy-free, so gen-repo and the spec checks import it without importing a hook."""

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
#: ``intra_op_threads: adaptive``: every core for a run no other instance overlaps, the share otherwise.
ADAPTIVE = "adaptive"
#: ``spin_threads: solo`` (the default): adaptive's every-core session spins within a run and stops at
#: its end (no peer runs then); the sessions that share the cores with peers never spin.
SOLO_SPIN = "solo"
#: export.json's key for what the served ONNX session needs (see ``onnx_hook.session``).
SERVING_KEY = "onnxruntime"


def config_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """A model config's ``parameters`` (as Triton hands the config to ``initialize``) as plain strings."""
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def hook_parameters(params: Mapping[str, str]) -> dict[str, str]:
    """What a hook's ``init`` sees: every parameter except the toolkit's own."""
    return {k: v for k, v in params.items() if not k.startswith(RESERVED)}


def thread_parameters(params, where: str = "parameter") -> tuple[int | None, str]:
    """``intra_op_threads`` (None: adaptive, also when unset) and ``spin_threads``; gen-repo refuses
    a bad value with the same check (spec.check_onnx_parameters) before the model ever loads."""
    raw = params.get("intra_op_threads")
    threads = None
    if raw is not None and str(raw).strip().lower() != ADAPTIVE:
        value = str(raw).strip()
        if not (value.isdigit() and int(value) > 0):
            raise ValueError(f"{where} intra_op_threads: expected a positive integer or {ADAPTIVE!r}, got {raw!r}")
        threads = int(value)
    spin = str(params.get("spin_threads", SOLO_SPIN)).lower()
    if spin not in ("false", "true", "run", SOLO_SPIN):
        raise ValueError(f"{where} spin_threads: expected false, true, run or {SOLO_SPIN}, got {spin!r}")
    return threads, spin


def read_export(model_dir) -> dict:
    """The version folder's export.json (what `toolkit export` wrote), or {}."""
    import json

    try:
        export = json.loads((model_dir / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return export if isinstance(export, dict) else {}


#: The embedded ONNX hook's GPU placement (gen-repo writes them from instance_group / optimization;
#: repository/placement.py). ``gpu.devices``: one entry per instance slot, a device id or ``cpu``.
GPU_PREFIX = "gpu."
GPU_DEVICES = "gpu.devices"
GPU_ACCELERATOR = "gpu.accelerator"
GPU_FALLBACK = "gpu.allow_cpu_fallback"
#: ``gpu.option.<key>``: the onnxruntime backend's accelerator keys (precision_mode, max_workspace_size_bytes, ...).
GPU_OPTION_PREFIX = "gpu.option."


def gpu_parameters(params: Mapping[str, str]) -> tuple[list[str], str, dict[str, str], bool] | None:
    """``(devices per instance slot, accelerator, its options, allow_cpu_fallback)``, or None when
    the model runs on the CPU only. ``toolkit serve`` reads the same parameters to refuse, before it
    starts, a repository that needs a GPU this machine does not have."""
    raw = params.get(GPU_DEVICES)
    if raw is None:
        return None
    devices = [d.strip() for d in str(raw).split(",") if d.strip()]
    options = {k[len(GPU_OPTION_PREFIX):]: str(v) for k, v in params.items() if k.startswith(GPU_OPTION_PREFIX)}
    fallback = str(params.get(GPU_FALLBACK, "false")).lower() == "true"
    return devices, str(params.get(GPU_ACCELERATOR, "cuda")), options, fallback
