"""Run tritonserver on this machine and keep it serving.

    process.py     TritonServer: environment, launch, readiness, drain and stop, restart on its ports
    supervisor.py  the one supervisor: heals dead stubs and a dead or wedged tritonserver, with
                   back-off and a crash-loop limit, under the repository lock (toolkit/files.py)
    stubs.py       facts about the python stubs: Stub, /proc children, shared-memory regions
    replicas.py    ReplicaSet: several servers over one repository, each with its own supervisor
    gpus.py        the NVIDIA GPUs this machine has, against those the repository's configs ask for

Imports: ``toolkit.errors``, ``toolkit.files``, the admin client (``toolkit.client.admin``) and
the stub side's ``toolkit.runtime`` (occupancy, params) only; lifecycle/, gateway/, bench/ and the CLI build
on this package.
"""

from toolkit.server.process import (
    BLAS_THREAD_VARIABLES,
    ApiRestriction,
    TritonServer,
    bundled_server_dir,
    check_repository,
    free_ports,
    prepare_backends,
    python_library_dir,
    stub_environment,
)

__all__ = ["BLAS_THREAD_VARIABLES", "ApiRestriction", "TritonServer", "bundled_server_dir", "check_repository",
           "free_ports", "prepare_backends", "python_library_dir", "stub_environment"]
