"""Does this machine have the NVIDIA GPUs a repository asks for? Checked before tritonserver starts.

A repository needs a GPU where a config has a ``KIND_GPU`` instance group (Triton refuses to load it
without one), or where the embedded ONNX hook's ``gpu.devices`` names a device and the spec did not
allow the CPU fallback. Without the GPUs, ``toolkit serve`` stops with one line naming the models,
instead of starting a server whose models fail one by one (or, worse, quietly run on the CPU).

GPUs are counted the way the driver shows them: ``nvidia-smi -L`` (one ``GPU <i>: ...`` line each),
else the driver's ``/proc/driver/nvidia/gpus/`` entries.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from toolkit.errors import ServerError
from toolkit.runtime.params import gpu_parameters

PROC_GPUS = Path("/proc/driver/nvidia/gpus")


@dataclass(frozen=True)
class GpuInventory:
    count: int
    #: How it was found, or why none was (for the error line).
    how: str


def find_gpus(timeout: float = 10.0) -> GpuInventory:
    """The NVIDIA GPUs this machine's driver shows."""
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"nvidia-smi -L failed: {e}"
        else:
            gpus = [line for line in done.stdout.splitlines() if line.startswith("GPU ")]
            if done.returncode == 0 and gpus:
                return GpuInventory(len(gpus), f"nvidia-smi -L lists {len(gpus)}")
            why = f"nvidia-smi -L exit {done.returncode}: {(done.stderr or done.stdout).strip()[:160] or 'no GPU'}"
    else:
        why = "nvidia-smi: not found"
    try:
        entries = [p for p in PROC_GPUS.iterdir()] if PROC_GPUS.is_dir() else []
    except OSError:
        entries = []
    if entries:
        return GpuInventory(len(entries), f"{PROC_GPUS} lists {len(entries)}")
    return GpuInventory(0, f"{why}; {PROC_GPUS}: absent")


def gpu_demands(repository: Path, models: list[str]) -> dict[str, set[int]]:
    """The models of ``repository`` that cannot serve without a GPU, each with the device ids it names
    (an empty set: Triton's "every GPU", at least one)."""
    demands: dict[str, set[int]] = {}
    for name in models:
        config = model_config_pb2.ModelConfig()
        try:
            text_format.Parse((repository / name / "config.pbtxt").read_text(encoding="utf-8"), config)
        except (OSError, text_format.ParseError):
            continue  # Triton reports a broken config itself, with its reason
        devices: set[int] = set()
        needs = False
        for group in config.instance_group:
            if group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU:
                needs = True
                devices.update(group.gpus)
        placement = gpu_parameters({k: v.string_value for k, v in config.parameters.items()})
        if placement is not None and not placement[3]:
            named = {int(d) for d in placement[0] if d.isdigit()}
            needs = needs or bool(named)
            devices |= named
        if needs:
            demands[name] = devices
    return demands


def check_gpus(repository: Path, models: list[str], inventory: GpuInventory | None = None) -> None:
    """Raise one ``ServerError`` when a model needs a GPU this machine does not have."""
    demands = gpu_demands(repository, models)
    if not demands:
        return
    inventory = inventory or find_gpus()
    names = ", ".join(sorted(demands))
    if inventory.count == 0:
        raise ServerError(f"{names}: the spec asks for a GPU (instance_group kind gpu) but this machine has no "
                          f"NVIDIA GPU ({inventory.how}); serve on a GPU machine, or set allow_cpu_fallback: true "
                          "in the model.yaml of an onnx model that may run on the CPU")
    missing = {name: sorted(d for d in devices if d >= inventory.count) for name, devices in demands.items()}
    missing = {name: ids for name, ids in missing.items() if ids}
    if missing:
        said = "; ".join(f"{name} GPU {', '.join(map(str, ids))}" for name, ids in sorted(missing.items()))
        raise ServerError(f"{said}: no such device, this machine has {inventory.count} GPU(s) "
                          f"(0..{inventory.count - 1}; {inventory.how}); fix gpus in the instance_group")
