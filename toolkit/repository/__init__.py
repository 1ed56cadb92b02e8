"""``toolkit gen-repo``: YAML specs -> a validated Triton model repository on disk.

    spec.py        the specs as typed data (pydantic), checked field by field
    project.py     a folder of model folders and ensemble specs -> a validated Project
    dag.py         ensembles as data: step order, one producer per tensor, dtypes and dims agree
    render.py      one config.pbtxt: a protobuf-shaped dict, Jinja2, then Triton's real ModelConfig
    templates/     config.pbtxt.j2
    fused_plan.py  an ``execution: fused`` ensemble: its fused.json plan and its config
    versions.py    one version folder (gen-repo, the fused plan and rollout share it)
    generate.py    the one render loop (``gen-repo`` and ``gen-repo --check``) and the atomic write

Imports: ``toolkit.errors``, ``toolkit.files`` and the stub side's contract
(``toolkit.runtime.params``); never the server, the client or the CLI.
"""

from toolkit.repository.generate import MARKER, RepositoryReport, check_repository, generate_repository
from toolkit.repository.project import Project, load_project

__all__ = ["MARKER", "Project", "RepositoryReport", "check_repository", "generate_repository", "load_project"]
