"""TensorFlow/Keras models and Python hooks, served by NVIDIA Triton.

The folder names are the architecture; imports point down this list, never up:

    runtime/      everything Triton's python stub runs (numpy only, Python 3.10): the hook contract,
                  codes, params, the adapter, batching, the fused runner, occupancy, metrics, the
                  ONNX hook. Imports nothing else of toolkit. With builtins/ and hooks.py it is the
                  stub side (runtime.STUB_SIDE).
    hooks.py      what users import (Hook, HookContext, HookError): a re-export of runtime.hooks
    builtins/     built-in hooks specs name as toolkit.builtins.<module>:<Class> (stub side)
    errors.py     the one ToolkitError tree; files.py  atomic folder replacement
    repository/   gen-repo: specs -> a validated Triton model repository
    client/       talk to a running Triton: inference, its errors, retry, balancing
    server.py, watchdog.py, replicas.py   run tritonserver here (to become server/)
    gateway/, lifecycle/, deploy/, export/, bench/   build on the above
    cli/          one module per command; imports everything, imported by nothing

repository/ and client/ import only errors, files and the stub side's contract (runtime.params,
runtime.codes). tests/unit/test_layout.py reads every module's imports and fails on a cycle or on a
stub-side module importing outside the stub side.
"""

__version__ = "0.1.0"
