"""The ``toolkit`` command: the group and the error mapping only; each command is a module of its own.

Every ``ToolkitError`` becomes ``Error: <message>`` and exit code 1, never a traceback. Heavy imports
(tensorflow, tritonclient) happen inside the commands that need them, so ``toolkit --help`` is instant.
"""

from __future__ import annotations

import click

from toolkit.cli.bench import bench
from toolkit.cli.export import export
from toolkit.cli.gateway import gateway
from toolkit.cli.infer import infer
from toolkit.cli.lifecycle import rollback, rollout, versions
from toolkit.cli.package import package
from toolkit.cli.repo import gen_repo
from toolkit.cli.serve import serve
from toolkit.cli.tune import tune
from toolkit.errors import ToolkitError


class ToolkitGroup(click.Group):
    """Turns the toolkit's own errors into click's ``Error: ...`` (exit 1) for every subcommand,
    including groups added from other modules."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except ToolkitError as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=ToolkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tf-triton-toolkit")
def cli() -> None:
    """Put TensorFlow/Keras models and Python hooks into production on NVIDIA Triton."""


cli.add_command(gen_repo)
cli.add_command(infer)
cli.add_command(export)
cli.add_command(bench)
cli.add_command(gateway)
cli.add_command(serve)
cli.add_command(package)
cli.add_command(rollout)
cli.add_command(rollback)
cli.add_command(versions)
cli.add_command(tune)
