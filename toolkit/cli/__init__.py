"""The thin click CLI over the library: one module per command, each parsing options and calling one
library function; main.py holds the group and the error mapping only.

    main.py  the ``toolkit`` group; every ToolkitError -> ``Error: ...``, exit 1
    repo.py gen-repo · infer.py infer · serve.py serve · export.py export · gateway.py gateway
    package.py package · lifecycle.py rollout, rollback · bench.py bench

Imports: anything of ``toolkit`` (heavy modules inside the command that needs them, so
``toolkit --help`` is instant); nothing of ``toolkit`` imports the CLI.
"""
