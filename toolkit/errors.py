"""One error tree for the whole toolkit.

Everything the toolkit raises on purpose derives from ``ToolkitError``; the CLI catches only the
root and prints ``Error: <message>`` with exit code 1, so a user's own mistake never shows a
traceback. Third-party exceptions are wrapped with ``raise ... from e`` at the boundary where we
know what the user was trying to do.

    ToolkitError
    ├── SpecError          a model or ensemble spec is malformed (names file, model, field)
    │   └── EnsembleError  an ensemble's DAG is miswired (cycle, missing producer, dtype clash, ...)
    ├── RenderError        a rendered config.pbtxt is not a valid Triton ModelConfig
    ├── RepositoryError    the model repository could not be written
    ├── ServerError        tritonserver could not start or stopped unexpectedly
    │   └── ModelLoadError one or more models failed to load (names them and Triton's reason)
    ├── InferenceError     a request to a running server failed (carries Triton's message)
    ├── GatewayError       the REST gateway cannot start: bad settings, Triton unreachable, no API
    ├── LifecycleError     a rollout or rollback was refused; the served version keeps serving
    ├── ExportError        a model could not be exported to ONNX, or the ONNX model disagrees
    │   └── WeightError    a checkpoint's weights are missing, unused or of the wrong shape
    ├── BenchError         the benchmark cannot produce numbers worth trusting
    │   └── TuneError      Model Analyzer cannot run, failed, or its results cannot be read or applied
    └── PeerError          a peer server could not be installed, started, matched or kept on loopback

Hook code running inside Triton uses ``toolkit.hooks.HookError`` (a request-level error with a
numeric code); it is deliberately not part of this tree because it travels to clients as data.
"""

from __future__ import annotations


class ToolkitError(Exception):
    """Root of every error the toolkit raises on purpose."""


class SpecError(ToolkitError):
    """A spec file is malformed. The message names the file, the model and the field."""

    def __init__(self, message: str, *, file: str | None = None, model: str | None = None,
                 field: str | None = None):
        self.file, self.model, self.field = file, model, field
        where = []
        if file:
            where.append(str(file))
        if model:
            where.append(f"model '{model}'")
        if field:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)
        self.reason = message


class EnsembleError(SpecError):
    """An ensemble's steps are miswired."""


class RenderError(ToolkitError):
    """A rendered config.pbtxt failed validation against Triton's ModelConfig protobuf."""


class RepositoryError(ToolkitError):
    """The model repository could not be written."""


class ServerError(ToolkitError):
    """tritonserver could not be started, or it died."""


class ModelLoadError(ServerError):
    """Models failed to load; ``failures`` maps model name -> Triton's reason."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        lines = "\n".join(f"  {name}: {reason}" for name, reason in sorted(failures.items()))
        super().__init__(f"{len(failures)} model(s) failed to load:\n{lines}")


class InferenceError(ToolkitError):
    """A request to Triton failed; ``code`` is the hook's numeric code when it sent one."""

    def __init__(self, message: str, *, code: int | None = None, status: str | None = None):
        self.code, self.status = code, status
        super().__init__(message)


class GatewayError(ToolkitError):
    """The REST gateway's settings are invalid, or it cannot discover its APIs from Triton.

    Problems of a single request are not exceptions of this tree: the gateway answers them with a
    go-infer envelope carrying a numeric code.
    """


class TritonAdminError(ToolkitError):
    """A call of Triton's admin API (repository, config, statistics) failed; ``status`` is its HTTP
    status, 0 when Triton could not be reached or did not answer in time."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class LifecycleError(ToolkitError):
    """A rollout or rollback could not be done; the message says why, and the version that was
    serving still serves."""


class ExportError(ToolkitError):
    """Export to ONNX failed, or the exported model does not compute what the source computes."""


class WeightError(ExportError):
    """Checkpoint weights do not match the model being built."""


def first_line(error: BaseException | str, limit: int = 500) -> str:
    """The first non-empty line of an exception's (or a message's) text, for a one-line ``Error:``:
    TensorFlow, tf2onnx and onnxruntime put stack traces and dumps after it."""
    text = str(error)
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not line:
        return type(error).__name__ if isinstance(error, BaseException) else "(no message)"
    return line[:limit]


class BenchError(ToolkitError):
    """The benchmark cannot produce numbers worth trusting (server not ready, errors, instability)."""


class TuneError(BenchError):
    """``toolkit tune``: Model Analyzer is missing or failed (the message says where its log is), the search
    does not fit the model's spec, or the winner cannot be written back into model.yaml."""


class PeerError(ToolkitError):
    """A peer server could not be installed, started, matched against ours, or kept on loopback."""
