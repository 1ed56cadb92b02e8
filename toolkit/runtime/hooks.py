"""The hook API: go-infer's ``Model`` interface (ApiPath / ApiEntry / Init / Infer) in Python.

A user writes one class; the toolkit's fixed Triton adapter (``toolkit/runtime/adapter.py``) drives it:

    class Tokenizer(Hook):
        api_path = "embedding"                      # name clients and the REST gateway use

        def init(self, ctx):                        # once per model instance: load weights
            self.vocab = (ctx.model_dir / "vocab.txt").read_text()

        def api_entry(self, request):               # once per request: validate, normalise
            if request["TEXT"].size == 0:
                raise HookError(1001, "TEXT must not be empty")
            return request

        def infer(self, batch):                     # once per dynamic batch, on stacked inputs
            return {"IDS": ...}

        def finalize(self):                         # optional: release resources
            ...

Tensors are numpy arrays keyed by tensor name. For a model with ``max_batch_size > 0`` every
array has the batch as its first axis: ``api_entry`` sees one request's arrays, ``infer`` sees the
requests of one dynamic batch concatenated along axis 0 and must return arrays whose first axis has
the same total length, which the adapter splits back per request. BYTES tensors are numpy object
arrays of ``bytes``.

This module is imported inside Triton's python stub, so it must stay light (numpy only) and
Python 3.10 compatible (the 24.10 container's stub is 3.10). Users import it as ``toolkit.hooks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.runtime.codes import format_coded_message
from toolkit.runtime.occupancy import Occupancy


class HookError(Exception):
    """A request-level failure the client is meant to see: a numeric code and a message.

    Raise it from ``api_entry`` (or ``infer``) to reject a request; only that request fails. The
    client receives ``"[<code>] <message>"``; no traceback leaves the server.
    """

    def __init__(self, code: int, message: str):
        if not isinstance(code, int) or isinstance(code, bool) or code < 0:
            raise TypeError(f"HookError code must be a non-negative int, got {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    def wire_message(self) -> str:
        return format_coded_message(self.code, self.message)


@dataclass(frozen=True)
class HookContext:
    """What ``init`` gets to know about the model instance it runs in."""

    model_name: str
    model_version: int
    #: The version folder: exported artifacts (model.onnx, vocab.txt) and the hook's files live here.
    model_dir: Path
    #: The model's config ``parameters`` (strings), with the toolkit's own ``toolkit.*`` keys removed.
    parameters: dict[str, str] = field(default_factory=dict)
    instance_name: str = ""
    #: How many instances of this model Triton runs (its ``instance_group`` count): size thread
    #: pools as ``cores // instance_count`` so instances do not fight over cores.
    instance_count: int = 1
    #: This instance's place among them, 0 .. instance_count - 1 (in the order of the config's
    #: instance groups): the ONNX hook picks its GPU by it.
    instance_index: int = 0
    max_batch_size: int = 0
    #: Whether another instance of this model is executing a batch right now
    #: (``occupancy.others_busy()``): a hook may then size a run's thread pool to its share.
    occupancy: Occupancy = field(default_factory=Occupancy)


class Hook:
    """Base class for user hooks. Only ``infer`` is required."""

    #: The name under which clients and the REST gateway reach this model (go-infer's ApiPath).
    api_path: str | None = None

    def init(self, ctx: HookContext) -> None:
        """Load weights and other state. Called once per model instance."""

    def api_entry(self, request: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate and normalise one request. Raise ``HookError`` to reject it."""
        return request

    def infer(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Compute the outputs of one dynamic batch."""
        raise NotImplementedError(f"{type(self).__name__} must implement infer(batch)")

    def finalize(self) -> None:
        """Release resources when Triton unloads the model."""
