"""The export zoo: every ``keras.applications`` model through ``toolkit export keras``, checked
independently on the path Triton serves; the table in export/README.md ("Every keras.applications
model").

    ./dev.sh zoo [--models ResNet50,VGG16] [--configs default,notop] [--input-size 224] [--retry-failed]
    python -m toolkit.export.zoo --out build/zoo/results.json --table export/README.md [same options]

For each model and configuration (``default``: the application as built, classifier included;
``notop``: ``--no-include-top --pooling avg``), ``run_one``:

1. builds ``keras.applications.NAME(weights=None, ...)`` (seeded), makes its random weights
   *informative* (``informative_weights``) and saves them with ``model.save_weights``;
2. runs the real CLI, as a user would: ``toolkit export keras NAME --weights FILE --input-size S
   [--no-include-top --pooling avg] --out DIR --quiet``, timing it and taking its peak RSS from
   ``os.wait4`` (the kernel's ``ru_maxrss`` of that child: exact, unlike polling);
3. if it exported, rebuilds the model from the same weights file and runs fresh check images (a seed
   the export never sees) through Keras (``training=False``) and through the ONNX file opened by
   ``toolkit.runtime.onnx_hook.session``, the function Triton's ONNX hook serves with, given what
   the export recorded for serving (export.json's ``onnxruntime`` entry). The export's own check is
   not trusted: ``rel_diff`` is max|onnx - keras| / max|keras| per output, the max over outputs.
   ``rel_diff_unoptimized`` is the same with onnxruntime's graph optimizations off (a served-path
   difference that vanishes there is onnxruntime's optimizer, not the conversion), and ``spread``
   how much the Keras outputs vary across the check images, relative to their peak (near 0: the
   comparison could not tell a right model from one that ignores its input).

Each step is a child process, one at a time, and this process never imports TensorFlow: on Linux a
child's ru_maxrss starts at its parent's RSS (the high-water mark survives fork and exec), so an
export launched from a process holding TensorFlow and a model would report that process's size.

Results are appended to ``--out`` (JSON) after every entry; a second run skips what is there, so an
interrupted run continues (``--retry-failed`` redoes the entries that did not export or differ).
``--table FILE`` rewrites the part of FILE between ``<!-- zoo:begin -->`` and ``<!-- zoo:end -->``.

Why informative weights: a ``weights=None`` application is nearly blind to its input. Its
BatchNormalization layers hold mean 0 / variance 1, so activations shrink layer after layer and
MobileNet's softmax is 1/1000 for every image to 7 digits: an export that got the first half of
the network wrong would still "match". Setting every BN layer's moving statistics to those of a
batch of images (what training leaves behind) keeps each layer's output at unit scale, so the
output depends on the input as a trained model's does (see ``informative_weights`` for the rest).

Check images (``smooth_images``): low-frequency random fields (an 8x8 random grid per channel,
upsampled bicubically), each image with its own brightness, contrast and tint, in the value range the
model's first layer sees in use (``input_range``): raw pixels 0..255 for the families that
rescale/normalise inside the model (EfficientNet, EfficientNetV2, ConvNeXt, MobileNetV3), and
otherwise the range of the family's ``preprocess_input``: [-1, 1] ("tf" mode: ResNet*V2,
InceptionV3, InceptionResNetV2, Xception, MobileNet, MobileNetV2, NASNet), about [-2.1, 2.6]
("torch" mode: DenseNet) and about [-124, 152] ("caffe" mode, BGR minus the ImageNet mean: ResNet50/
101/152, VGG16/19).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.export.defaults import KERAS_APPLICATIONS, REL_TOLERANCE
from toolkit.export.images import CAFFE_MODE, RAW, TF_MODE, TORCH_MODE, input_range, smooth_images  # noqa: F401
from toolkit.export.verify import NUDGE

CONFIGS = {"default": (True, None), "notop": (False, "avg")}
#: How the table and the results name a configuration.
CONFIG_LABELS = {"default": "default", "notop": "no-top avg"}
#: A served-path difference above this is a wrong export (as the exporter's --rel-tolerance default):
#: float32 TF vs onnxruntime agree to ~1e-6..5e-5 of the peak on these models, a wrong one is 1e-2 off.
REL_LIMIT = REL_TOLERANCE
#: Keras outputs that vary less than this across the check images (relative to their peak) make the
#: comparison meaningless.
MIN_SPREAD = 1e-3
CHECK_IMAGES = 4
CALIBRATION_SEED = 1
CHECK_SEED = 1001
TIMEOUT_S = 1800
BEGIN, END = "<!-- zoo:begin -->", "<!-- zoo:end -->"

def calibration_count(size: int) -> int:
    """Images for ``informative_weights``: 8 at full size; 32 below 128 px, where the last stages are
    1x1 or 2x2 and 8 images would leave some BN channels with a near-zero variance that then blows
    up (EfficientNetV2B0 at 32 px: features of 1e4 and a one-hot softmax)."""
    return 8 if size >= 128 else 32


def config_name(include_top: bool, pooling: str | None) -> str:
    return "default" if include_top and pooling is None else "notop" if not include_top and pooling == "avg" \
        else f"{'top' if include_top else 'notop'}-{pooling or 'none'}"


# --- images and weights ---------------------------------------------------------------------------

def _all_layers(model) -> list:
    """Every layer inside ``model``, nested models and sub-layers of custom layers included."""
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    found, stack = [], list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop()
        found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def informative_weights(model, images: np.ndarray, seed: int = 0) -> dict[str, int]:
    """Make a randomly initialised Keras model's outputs depend on its input the way trained
    weights do, in place; returns how many layers of each kind were set.

    - every BatchNormalization layer (nested models included) gets the moving mean and variance of
      ``images``' batch at its input: one forward pass with ``training=True`` while each BN layer's
      momentum is 0.0 (and its ``trainable`` True: a frozen BN ignores ``training``), then restored;
      in that pass each BN already normalises with those same batch statistics, so every layer
      downstream is calibrated on what it will see at inference;
    - a Normalization layer with adaptable statistics (EfficientNet's: mean 0 / variance 1 when
      built without ImageNet weights) gets its input's mean and variance in the same pass, so an
      export that drops or freezes them wrongly shows;
    - ConvNeXt's LayerScale gammas (initialised to 1e-6, which makes every block's residual branch
      invisible) get values in [0.1, 1], as trained ones have;
    - dropout is off during the pass (rates restored afterwards), so the statistics are those of
      inference.
    """
    import keras
    import tensorflow as tf

    layers = _all_layers(model)
    bns = [la for la in layers if isinstance(la, keras.layers.BatchNormalization) and not la.renorm]
    norms = [la for la in layers if isinstance(la, keras.layers.Normalization)
             and getattr(la, "input_mean", None) is None and getattr(la, "adapt_mean", None) is not None]
    dropouts = [la for la in layers if isinstance(la, keras.layers.Dropout | keras.layers.GaussianDropout
                                                  | keras.layers.AlphaDropout)]
    noises = [la for la in layers if isinstance(la, keras.layers.GaussianNoise)]
    scales = [la for la in layers if type(la).__name__ == "LayerScale" and hasattr(la, "gamma")]

    rng = np.random.default_rng(seed)
    for layer in scales:
        layer.gamma.assign(rng.uniform(0.1, 1.0, size=tuple(layer.gamma.shape)).astype(np.float32))

    def calibrating(layer):
        original = layer.call

        def call(inputs, *args, **kwargs):
            x = tf.convert_to_tensor(inputs, dtype=tf.float32)
            mean, variance = tf.nn.moments(x, axes=list(layer._reduce_axis))
            layer.adapt_mean.assign(tf.reshape(mean, layer.adapt_mean.shape))
            layer.adapt_variance.assign(tf.reshape(tf.maximum(variance, 1e-6), layer.adapt_variance.shape))
            layer.finalize_state()
            return original(inputs, *args, **kwargs)

        return call

    saved_bn = [(la.momentum, la.trainable) for la in bns]
    saved_rates = [la.rate for la in dropouts]
    saved_noise = [la.stddev for la in noises]
    try:
        for layer in bns:
            layer.momentum = 0.0
            layer.trainable = True
        for layer in dropouts:
            layer.rate = 0.0
        for layer in noises:
            layer.stddev = 0.0
        for layer in norms:
            object.__setattr__(layer, "call", calibrating(layer))
        model(tf.constant(images), training=True)
    finally:
        for layer, (momentum, trainable) in zip(bns, saved_bn, strict=True):
            layer.momentum = momentum
            layer.trainable = trainable
        for layer, rate in zip(dropouts, saved_rates, strict=True):
            layer.rate = rate
        for layer, stddev in zip(noises, saved_noise, strict=True):
            layer.stddev = stddev
        for layer in norms:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
    return {"batch_normalization": len(bns), "normalization": len(norms), "layer_scale": len(scales),
            "dropout": len(dropouts) + len(noises)}


def weights_bytes(model) -> int:
    """The model's variables' bytes (trainable and not)."""
    return int(sum(np.prod(v.shape, dtype=np.int64) * np.dtype(str(v.dtype)).itemsize for v in model.weights))


# --- comparing ------------------------------------------------------------------------------------

def spread(outputs: Sequence[np.ndarray]) -> float:
    """How much outputs vary across the batch (axis 0), relative to their peak: the smallest over
    outputs of max|y_i - y_0| / max|y| (0 when there is one image)."""
    values = []
    for y in outputs:
        y = np.asarray(y, dtype=np.float64)
        peak = float(np.abs(y).max()) if y.size else 0.0
        values.append(float(np.abs(y - y[:1]).max()) / peak if peak > 0 else 0.0)
    return min(values, default=0.0)


def max_rel_diff(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> float:
    """max over outputs of max|other - reference| / max|reference| (inf if shapes differ)."""
    worst = 0.0
    for ref, got in zip(reference, other, strict=True):
        ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
        if ref.shape != got.shape:
            return float("inf")
        peak = float(np.abs(ref).max())
        diff = float(np.abs(got - ref).max())
        worst = max(worst, diff / peak if peak > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def keras_outputs(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """``model(images, training=False)``, keyed by the output names the exporter gives them."""
    import tensorflow as tf

    result = model(tf.constant(images), training=False)
    if isinstance(result, dict):
        return {k: np.asarray(v) for k, v in result.items()}
    flat = [np.asarray(t) for t in tf.nest.flatten(result)]
    names = list(getattr(model, "output_names", None) or [f"output_{i}" for i in range(len(flat))])
    return dict(zip(names, flat, strict=True))


def served_outputs(version_dir: Path, images: np.ndarray, optimized: bool = True) -> dict[str, np.ndarray]:
    """The exported ``version_dir/model.onnx`` on ``images``, through the session Triton's ONNX hook
    serves with (``onnx_hook.session`` with export.json's ``onnxruntime`` entry); ``optimized=False``:
    the same with every graph optimization off."""
    import onnxruntime

    from toolkit.runtime.onnx_hook import SERVING_KEY, read_export, session

    serving = read_export(Path(version_dir)).get(SERVING_KEY)
    if not optimized:
        serving = {**(serving if isinstance(serving, dict) else {}), "graph_optimization_level": "ORT_DISABLE_ALL"}
    sess = session(onnxruntime, Path(version_dir) / "model.onnx", 0, "false", serving)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ValueError(f"expected one image input, the ONNX model has {[i.name for i in inputs]}")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {inputs[0].name: images}), strict=True))


def pair_outputs(keras_out: dict[str, np.ndarray], onnx_out: dict[str, np.ndarray]
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Line Keras's outputs up with the ONNX file's: by name, else (one each, or renamed) in order."""
    if set(keras_out) == set(onnx_out):
        names = sorted(keras_out)
        return [keras_out[n] for n in names], [onnx_out[n] for n in names]
    if len(keras_out) != len(onnx_out):
        raise ValueError(f"Keras has outputs {sorted(keras_out)}, the ONNX file {sorted(onnx_out)}")
    return list(keras_out.values()), list(onnx_out.values())


def compare_served(model, version_dir: Path, images: np.ndarray) -> dict[str, float]:
    """rel_diff (served path), rel_diff_unoptimized and spread of ``model`` against its export."""
    reference = keras_outputs(model, images)
    ref, served = pair_outputs(reference, served_outputs(version_dir, images))
    _, plain = pair_outputs(reference, served_outputs(version_dir, images, optimized=False))
    nudged = images * (1 + NUDGE * np.random.default_rng(CHECK_SEED).standard_normal(images.shape))
    _, moved = pair_outputs(reference, keras_outputs(model, nudged.astype(np.float32)))
    return {"rel_diff": max_rel_diff(ref, served), "rel_diff_unoptimized": max_rel_diff(ref, plain),
            "spread": spread(ref), "source_unstable": max_rel_diff(ref, moved)}


# --- child processes ------------------------------------------------------------------------------

def run_measured(command: Sequence[str], *, timeout: float, stdout: Path, stderr: Path,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``command`` with its output in files; returns exit_code (None on timeout), seconds and
    peak_rss_gb, the latter from ``os.wait4`` (that child's own ru_maxrss, its waited-for children
    included). On timeout its whole process group is killed."""
    start = time.monotonic()
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        process = subprocess.Popen(list(command), stdout=out, stderr=err, env=env, cwd=cwd,
                                   start_new_session=True)
    timed_out = False
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() - start > timeout:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.1)
    seconds = time.monotonic() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait for it again
    return {"exit_code": None if timed_out else process.returncode, "seconds": seconds,
            "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "timed_out": timed_out}


def toolkit_command() -> list[str]:
    """The ``toolkit`` console script of this environment (as a user runs it), else ``python -m toolkit.cli``."""
    script = Path(sys.executable).parent / "toolkit"
    return [str(script)] if script.is_file() and os.access(script, os.X_OK) else [sys.executable, "-m", "toolkit.cli"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def baseline_rss(timeout: float = 300) -> float:
    """Peak RSS (GB) of a process that only imports tensorflow, keras and
    toolkit.export.keras_models: TensorFlow's own baseline, which the exports' memory is measured above.
    Call it from a process without TensorFlow loaded (see ``run_one``: a child inherits its parent's RSS
    as the start of its ru_maxrss)."""
    import tempfile

    code = "import tensorflow, keras, toolkit.export.keras_models"
    with tempfile.TemporaryDirectory() as tmp:
        result = run_measured([sys.executable, "-c", code], timeout=timeout, stdout=Path(tmp) / "out",
                              stderr=Path(tmp) / "err", env=child_env())
        if result["exit_code"] != 0:
            raise RuntimeError(f"importing TensorFlow failed: {(Path(tmp) / 'err').read_text()[-2000:]}")
    return result["peak_rss_gb"]


def error_line(stderr: str) -> str | None:
    """The CLI's ``Error: ...`` line, else the last non-empty stderr line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return errors[-1] if errors else (lines[-1] if lines else None)


# --- one model ------------------------------------------------------------------------------------

def build_application(name: str, include_top: bool, pooling: str | None, input_size: int,
                      weights: Path | None = None):
    import keras

    return getattr(keras.applications, name)(weights=str(weights) if weights else None, include_top=include_top,
                                             pooling=pooling, input_shape=(input_size, input_size, 3))


def prepare_weights(name: str, include_top: bool, pooling: str | None, input_size: int, weights: Path,
                    seed: int = 0) -> dict[str, Any]:
    """Build the application with seeded random weights, make them informative, save them to
    ``weights`` (``model.save_weights``); returns weights_mb and what ``informative_weights`` set."""
    import keras

    keras.utils.set_random_seed(seed)
    model = build_application(name, include_top, pooling, input_size)
    images = smooth_images(calibration_count(input_size), input_size, CALIBRATION_SEED, input_range(name))
    counts = informative_weights(model, images, seed)
    model.save_weights(str(weights))
    return {"weights_mb": round(weights_bytes(model) / 1e6, 1), "informative": counts}


def compare_export(name: str, include_top: bool, pooling: str | None, input_size: int, weights: Path,
                   version_dir: Path) -> dict[str, float]:
    """Rebuild the application from ``weights`` and compare it with ``version_dir``'s ONNX file on
    fresh check images (``compare_served``)."""
    model = build_application(name, include_top, pooling, input_size, weights)
    images = smooth_images(CHECK_IMAGES, input_size, CHECK_SEED, input_range(name))
    return {k: float(f"{v:.3g}") for k, v in compare_served(model, version_dir, images).items()}


_STEPS = {"prepare": prepare_weights, "compare": compare_export}


def _worker(argv: Sequence[str]) -> int:
    """``python -m toolkit.export.zoo _worker STEP RESULT.json ARGS.json``: one TensorFlow step of
    ``run_one`` in its own process, its result as JSON."""
    step, result, arguments = argv
    kwargs = json.loads(Path(arguments).read_text(encoding="utf-8"))
    for key in ("weights", "version_dir"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key])
    Path(result).write_text(json.dumps(_STEPS[step](**kwargs)), encoding="utf-8")
    return 0


def _run_step(step: str, folder: Path, timeout: float, **kwargs: Any) -> dict[str, Any]:
    """Run a ``_worker`` step in a child process; raises RuntimeError with its last stderr line."""
    arguments, result = folder / f"{step}.args.json", folder / f"{step}.result.json"
    arguments.write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}),
                         encoding="utf-8")
    result.unlink(missing_ok=True)
    run = run_measured([sys.executable, "-m", "toolkit.export.zoo", "_worker", step, str(result), str(arguments)],
                       timeout=timeout, stdout=folder / f"{step}.stdout", stderr=folder / f"{step}.stderr",
                       env=child_env())
    if run["exit_code"] != 0 or not result.is_file():
        stderr = (folder / f"{step}.stderr").read_text(encoding="utf-8", errors="replace")
        why = "timed out" if run["timed_out"] else error_line(stderr) or f"exit code {run['exit_code']}"
        raise RuntimeError(f"{step}: {why}")
    return json.loads(result.read_text(encoding="utf-8"))


def run_one(name: str, include_top: bool, pooling: str | None, input_size: int, workdir: Path, *,
            timeout: float = TIMEOUT_S, keep: bool = False) -> dict[str, Any]:
    """Export ``keras.applications.NAME`` with informative weights through the CLI and compare it with
    Keras on the served path; see the module docstring. Returns the result entry.

    TensorFlow never runs in this process: preparing the weights and comparing run in child processes
    too (one at a time). A child's ru_maxrss starts from its parent's RSS at fork time (Linux carries
    the parent's high-water mark through fork and exec), so an export launched from a process holding
    TensorFlow and a model would report that process's size instead of its own."""
    config = config_name(include_top, pooling)
    folder = Path(workdir) / f"{name}-{config}-{input_size}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    weights = folder / f"{name}.weights.h5"
    out = folder / "export"
    entry: dict[str, Any] = {"name": name, "config": CONFIG_LABELS.get(config, config), "input_size": input_size,
                             "exported": False, "exit_code": None, "error": None, "rel_diff": None,
                             "rel_diff_unoptimized": None, "spread": None, "export_seconds": None,
                             "peak_rss_gb": None, "weights_mb": None, "input_range": list(input_range(name)),
                             "date": datetime.date.today().isoformat()}
    model_args = {"name": name, "include_top": include_top, "pooling": pooling, "input_size": input_size,
                  "weights": weights}
    try:
        entry.update(_run_step("prepare", folder, timeout, **model_args))
        command = [*toolkit_command(), "export", "keras", name, "--weights", str(weights),
                   "--input-size", str(input_size)]
        if not include_top:
            command.append("--no-include-top")
        if pooling is not None:
            command += ["--pooling", pooling]
        command += ["--out", str(out), "--version", "1", "--quiet"]
        run = run_measured(command, timeout=timeout, stdout=folder / "export.stdout",
                           stderr=folder / "export.stderr", env=child_env())
        entry.update(exit_code=run["exit_code"], export_seconds=round(run["seconds"], 1),
                     peak_rss_gb=round(run["peak_rss_gb"], 3))
        stderr = (folder / "export.stderr").read_text(encoding="utf-8", errors="replace")
        version_dir = out / "1"
        entry["exported"] = run["exit_code"] == 0 and (version_dir / "model.onnx").is_file()
        if run["timed_out"]:
            entry["error"] = f"timed out after {timeout:.0f} s"
        elif not entry["exported"]:
            entry["error"] = error_line(stderr) or f"exit code {run['exit_code']}"
        else:
            export = json.loads((version_dir / "export.json").read_text(encoding="utf-8"))
            entry["serving"] = export.get("onnxruntime") or {}
            entry.update(_run_step("compare", folder, timeout, version_dir=version_dir, **model_args))
    except Exception as e:  # the harness's own failure (building, comparing): record it, go on
        entry["error"] = f"harness: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
            weights.unlink(missing_ok=True)
    return entry


# --- results and the table ------------------------------------------------------------------------

def good(entry: dict[str, Any] | None) -> bool:
    return bool(entry and entry.get("exported") and entry.get("rel_diff") is not None
                and entry["rel_diff"] <= REL_LIMIT and (entry.get("spread") or 0) >= MIN_SPREAD)


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("results", [])
        data.setdefault("meta", {})
        return data
    return {"meta": {}, "results": []}


def save_results(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) * 1024 / 1e9, 1)
    return {"nproc": cores, "cpu": cpu, "memory_gb": memory}


def tool_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("tensorflow-cpu", "keras", "tf2onnx", "onnx", "onnxruntime"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def _key(entry: dict[str, Any]) -> tuple[str, str, int]:
    return entry["name"], entry["config"], int(entry["input_size"])


def _cell(entry: dict[str, Any] | None, notes: list[str]) -> str:
    if entry is None:
        return "not run"
    if not entry.get("exported"):
        notes.append(f"{entry['name']} ({entry['config']}): {entry.get('error') or 'failed'}")
        return f"no [{len(notes)}]"
    rel = entry.get("rel_diff")
    if rel is None:
        notes.append(f"{entry['name']} ({entry['config']}): exported, not compared: {entry.get('error')}")
        return f"yes / ? [{len(notes)}]"
    text = f"yes / {rel:.1e}"
    problems = []
    unstable = entry.get("source_unstable")
    if rel > REL_LIMIT and unstable is not None and unstable > REL_LIMIT:
        text = "yes / **unstable**"
        problems.append(f"served path differs by {rel:.1e} of the peak, but Keras itself moves by {unstable:.1e} "
                        f"when the check images move by {NUDGE:g} (relative): with these random weights one image's "
                        "activations explode, and no float32 runtime can match that; the export's own check "
                        "matched on its images")
    elif rel > REL_LIMIT:
        text = f"yes / **{rel:.1e}**"
        unopt = entry.get("rel_diff_unoptimized")
        problems.append(f"served path differs by {rel:.1e} of the peak"
                        + (f" ({unopt:.1e} with onnxruntime's optimizations off)" if unopt is not None else ""))
    if (entry.get("spread") or 0) < MIN_SPREAD:
        problems.append(f"Keras outputs barely vary across the check images (spread {entry.get('spread')})")
    if problems:
        notes.append(f"{entry['name']} ({entry['config']}): {'; '.join(problems)}")
        text += f" [{len(notes)}]"
    return text


def _resources(entry: dict[str, Any] | None, baseline: float | None) -> tuple[str, str]:
    if entry is None or entry.get("export_seconds") is None:
        return "", ""
    seconds = f"{entry['export_seconds']:.0f} s"
    rss = entry.get("peak_rss_gb")
    if rss is None:
        return seconds, ""
    text = f"{rss:.1f}"
    if baseline is not None and entry.get("weights_mb"):
        text += f" ({(rss - baseline) * 1e3 / entry['weights_mb']:.1f}x)"
    return seconds, text


def render_table(data: dict[str, Any], input_size: int, results: Path | str = "build/zoo/results.json") -> str:
    """The markdown that goes between the markers."""
    meta = data.get("meta", {})
    entries = {_key(e): e for e in data.get("results", []) if int(e.get("input_size", 0)) == input_size}
    names = [n for n in KERAS_APPLICATIONS if any(k[0] == n for k in entries)]
    names += sorted({k[0] for k in entries} - set(names))
    baseline = meta.get("baseline_rss_gb")
    notes: list[str] = []
    rows = ["| model | weights (MB) | default: exported / max rel diff (served path) "
            "| no-top avg: exported / max rel diff | export time (default / no-top) "
            "| peak RSS, GB (x weights above the baseline) (default / no-top) |",
            "| --- | ---: | --- | --- | ---: | ---: |"]
    counts = {"default": [0, 0], "no-top avg": [0, 0]}
    for name in names:
        default, notop = entries.get((name, "default", input_size)), entries.get((name, "no-top avg", input_size))
        for label, entry in (("default", default), ("no-top avg", notop)):
            if entry is not None:
                counts[label][1] += 1
                counts[label][0] += bool(entry.get("exported"))
        cells = [_cell(default, notes), _cell(notop, notes)]
        times, memory = zip(_resources(default, baseline), _resources(notop, baseline), strict=True)
        weights = next((e["weights_mb"] for e in (default, notop) if e and e.get("weights_mb")), None)
        rows.append(f"| {name} | {weights if weights is not None else ''} | {cells[0]} | {cells[1]} "
                    f"| {' / '.join(t or '-' for t in times)} | {' / '.join(m or '-' for m in memory)} |")
    total = len(KERAS_APPLICATIONS)

    def count(label: str) -> str:
        done, tried = counts[label]
        return f"{done} of {total}" if tried == total else f"{done} of {tried} tried (of {total})"

    good_default = sum(good(entries.get((n, "default", input_size))) for n in names)
    good_notop = sum(good(entries.get((n, "no-top avg", input_size))) for n in names)
    host = meta.get("machine", {})
    versions = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    dates = sorted({e.get("date") for e in entries.values() if e.get("date")})
    lines = [
        f"**{count('default')} export with default options, {count('no-top avg')} with "
        f"`--no-include-top --pooling avg`** (input {input_size}x{input_size}); of those, "
        f"{good_default} and {good_notop} match Keras within {REL_LIMIT:g} of the output's peak on the served path.",
        "",
        *rows,
        "",
    ]
    if notes:
        lines += [*(f"[{i}] {note}  " for i, note in enumerate(notes, 1)), ""]
    lines += [
        f"Baseline: a process that only imports TensorFlow, Keras and the exporter peaks at "
        f"{baseline:.2f} GB; \"x weights\" is (peak RSS - baseline) / the model's weights."
        if baseline is not None else "Baseline: not measured.",
        f"Machine: {host.get('nproc', '?')} cores, {host.get('cpu', '?')}"
        + (f", {host['memory_gb']} GB RAM" if host.get("memory_gb") else "")
        + (f"; {versions}" if versions else "") + f"; run {', '.join(dates) if dates else '?'}"
        f" (`./dev.sh zoo`; raw numbers in {results}).",
    ]
    return "\n".join(lines)


def write_table(path: Path, table: str) -> None:
    """Replace the text between the markers in ``path`` (a new file gets just the markers and table)."""
    block = f"{BEGIN}\n{table}\n{END}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block + "\n", encoding="utf-8")
        return
    text = path.read_text(encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"Error: {path} has no {BEGIN} ... {END} section to rewrite")
    path.write_text(text[:start] + block + text[end + len(END):], encoding="utf-8")


# --- the command ----------------------------------------------------------------------------------

def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in KERAS_APPLICATIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown application(s) {', '.join(unknown)}; known: "
                                         f"{', '.join(KERAS_APPLICATIONS)}")
    return names


def _configs(text: str) -> list[str]:
    configs = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not configs:
        raise argparse.ArgumentTypeError(f"configs are {', '.join(CONFIGS)} (comma-separated), got {text!r}")
    return configs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m toolkit.export.zoo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=_names, default=list(KERAS_APPLICATIONS),
                        help="comma-separated keras.applications names [default: all 40]")
    parser.add_argument("--configs", type=_configs, default=list(CONFIGS),
                        help="default (classifier included) and/or notop (--no-include-top --pooling avg)"
                             " [default: default,notop]")
    parser.add_argument("--input-size", type=int, default=224, help="input height and width [default: 224]")
    parser.add_argument("--out", type=Path, default=Path("build/zoo/results.json"),
                        help="results (JSON); entries already there are skipped [default: build/zoo/results.json]")
    parser.add_argument("--table", type=Path, default=None,
                        help=f"rewrite the {BEGIN} ... {END} section of this markdown file")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="weights files, exports and logs [default: work/ next to --out]")
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per export [default: 1800]")
    parser.add_argument("--retry-failed", action="store_true",
                        help="redo entries that did not export, or exported wrongly, instead of skipping them")
    parser.add_argument("--keep", action="store_true", help="keep the weights files and ONNX exports")
    parser.add_argument("--table-only", action="store_true", help="only rewrite --table from --out's results")
    return parser.parse_args(argv)


def _summary(entry: dict[str, Any]) -> str:
    if not entry.get("exported"):
        return f"{entry['config']}: FAILED ({entry.get('export_seconds')} s) {(entry.get('error') or '')[:160]}"
    if entry.get("rel_diff") is None:
        return f"{entry['config']}: exported, compare failed: {entry.get('error')}"
    verdict = "ok" if good(entry) else "WRONG" if entry["rel_diff"] > REL_LIMIT else "weak"
    return (f"{entry['config']}: {verdict} rel {entry['rel_diff']:.1e} (unopt {entry['rel_diff_unoptimized']:.1e}, "
            f"spread {entry['spread']:.2g}) {entry['export_seconds']:.0f} s {entry['peak_rss_gb']:.2f} GB")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    data = load_results(args.out)
    if not args.table_only:
        workdir = args.workdir or args.out.parent / "work"
        meta = data["meta"]
        meta["machine"] = machine()
        meta["versions"] = tool_versions()
        if meta.get("baseline_rss_gb") is None:
            print("measuring the baseline (a process that only imports TensorFlow) ...", flush=True)
            meta["baseline_rss_gb"] = round(baseline_rss(), 3)
            print(f"baseline: {meta['baseline_rss_gb']:.2f} GB", flush=True)
        save_results(args.out, data)
        for index, name in enumerate(args.models, 1):
            done = []
            for config in args.configs:
                include_top, pooling = CONFIGS[config]
                key = (name, CONFIG_LABELS[config], args.input_size)
                old = next((e for e in data["results"] if _key(e) == key), None)
                if old is not None and not (args.retry_failed and not good(old)):
                    done.append(f"{_summary(old)} (from {args.out.name})")
                    continue
                entry = run_one(name, include_top, pooling, args.input_size, workdir, timeout=args.timeout,
                                keep=args.keep)
                data["results"] = [e for e in data["results"] if _key(e) != key] + [entry]
                save_results(args.out, data)
                done.append(_summary(entry))
            print(f"[{index}/{len(args.models)}] {name}: " + " | ".join(done), flush=True)
    if args.table:
        write_table(args.table, render_table(data, args.input_size, args.out))
        print(f"table written to {args.table}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[2:]) if sys.argv[1:2] == ["_worker"] else main())
