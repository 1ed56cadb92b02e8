"""Everything Triton's python stub runs: the hook contract, the fixed adapter and what it drives.

    hooks.py         Hook, HookContext, HookError: the user contract (re-exported as ``toolkit.hooks``)
    codes.py         the error codes and their ``[code] message`` wire format
    params.py        the gen-repo <-> stub contract: the ``toolkit.*`` config keys, the ONNX thread parameters
    adapter.py       TritonPythonModel, copied verbatim as every python model's ``<version>/model.py``
    batching.py      one dynamic batch through one hook
    fused_runner.py  runs an ``execution: fused`` ensemble's fused.json in one process
    occupancy.py     which instances of a model are busy; metrics.py the hook's Prometheus metrics
    onnx_hook.py     the built-in hook that runs an ONNX file with onnxruntime

Imports: the standard library, numpy (and, inside the stub, triton_python_backend_utils,
onnxruntime, prometheus_client where present), and ``toolkit.runtime`` itself - nothing else of
``toolkit``. Python 3.10 compatible (the 24.10 container's stub is 3.10; ruff.toml checks it).
tests/unit/test_layout.py enforces the import rule.
"""

#: The stub side: what the python stubs import, relative to the ``toolkit`` package. ``toolkit
#: package`` copies exactly this into the image; the layout test keeps it from importing anything else.
STUB_SIDE = ("hooks.py", "runtime", "builtins")
