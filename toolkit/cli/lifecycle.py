"""``toolkit rollout`` and ``toolkit rollback``: change the version a running server serves, with no
downtime, refusing a version that fails to load or fails its golden check (``toolkit/lifecycle``);
``toolkit versions``: what a model serves, its history and what it could serve."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from toolkit.errors import ToolkitError, TritonAdminError

_url_and_repository = [
    click.option("--url", default="127.0.0.1:8000", show_default=True, help="Triton's HTTP host:port."),
    click.option("--repository", type=click.Path(path_type=Path), default=Path("build/model_repository"),
                 show_default=True, help="The repository the server serves (what gen-repo wrote)."),
    click.option("--admin-header", default=None, metavar="KEY=VALUE", envvar="TOOLKIT_RESTRICT_APIS",
                 help="The KEY=VALUE of `toolkit serve --restrict-apis` (also $TOOLKIT_RESTRICT_APIS)."),
]
_common = [
    *_url_and_repository,
    click.option("--wait", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
                 help="When another rollout, rollback or heal holds the repository, wait this long for it "
                      "(default: refuse at once, naming it)."),
    click.option("--skip-golden-check", is_flag=True,
                 help="Promote without checking the version's golden.npz (not recommended)."),
]


def _options(command, options=None):
    for option in reversed(_common if options is None else options):
        command = option(command)
    return command


def _options_for_versions(command):
    return _options(command, _url_and_repository)


def _admin(url: str, admin_header: str | None):
    from toolkit.client.admin import TritonAdmin
    from toolkit.server import ApiRestriction

    headers = ApiRestriction.parse(admin_header).http_headers() if admin_header else None
    return TritonAdmin(url, headers)


@contextlib.contextmanager
def _admin_header_hint(admin_header: str | None) -> Iterator[None]:
    """Triton refused the repository API (403): the server was started with --restrict-apis, and the
    operator gave no header, or another one; say which option carries it."""
    try:
        yield
    except ToolkitError as e:
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, TritonAdminError):
            cause = cause.__cause__
        if cause is None or cause.status != 403:
            raise
        hint = ("pass the header `toolkit serve --restrict-apis` was given: --admin-header KEY=VALUE "
                "(or $TOOLKIT_RESTRICT_APIS)") if not admin_header else \
            "--admin-header is not the KEY=VALUE `toolkit serve --restrict-apis` was given"
        raise ToolkitError(f"{e}; the server restricts its repository API: {hint}") from e


@click.command()
@click.argument("model")
@click.option("--version", "version", type=click.IntRange(min=1), default=None,
              help="The version to serve [default: the newest in --models].")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Folder of model specs and their version folders.")
@_options
def rollout(model: str, version: int | None, models_dir: Path, url: str, repository: Path,
            admin_header: str | None, wait: float, skip_golden_check: bool) -> None:
    """Serve another version of MODEL on a running server, without downtime.

    The version is loaded beside the served one, checked against its golden.npz, and only then
    takes the traffic; on any failure the served version keeps serving and the exit status is 1.
    """
    from toolkit.lifecycle.rollout import rollout as do_rollout

    def announce(chosen: int) -> None:  # once the checks that need no loading have passed
        click.echo(f"Rolling out version {chosen} of '{model}' (loading the candidate, checking it) ...", err=True)

    with _admin_header_hint(admin_header):
        report = do_rollout(model, version=version, models_dir=models_dir, repository=repository,
                            admin=_admin(url, admin_header), golden_check=not skip_golden_check, wait=wait,
                            announce=announce)
    click.echo(report.summary())


@click.command()
@click.argument("model")
@_options
def rollback(model: str, url: str, repository: Path, admin_header: str | None, wait: float,
             skip_golden_check: bool) -> None:
    """Serve again the version MODEL served before its last rollout, without downtime.

    Each rollback goes one step further back in the rollout history (`toolkit versions MODEL`
    shows it), until there is no earlier version."""
    from toolkit.lifecycle.rollout import rollback as do_rollback

    with _admin_header_hint(admin_header):
        report = do_rollback(model, repository=repository, admin=_admin(url, admin_header),
                             golden_check=not skip_golden_check, wait=wait)
    click.echo(report.summary())


@click.command()
@click.argument("model")
@click.option("--models", "models_dir", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Folder of model specs and their version folders.")
@click.option("--json", "as_json", is_flag=True, help="Print it as JSON.")
@_options_for_versions
def versions(model: str, models_dir: Path, as_json: bool, url: str, repository: Path,
             admin_header: str | None) -> None:
    """What MODEL serves now, its rollout history, what a rollback would serve, and the versions
    on disk and in the sources (read only)."""
    import json

    from toolkit.lifecycle.rollout import versions as read_versions

    with _admin_header_hint(admin_header):
        found = read_versions(model, repository=repository, admin=_admin(url, admin_header), models_dir=models_dir)
    click.echo(json.dumps(found.to_dict(), indent=1) if as_json else found.render())
