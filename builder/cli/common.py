"""What every command module shares: the consoles, loading a class, common options, the Context."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console

from builder.core import paths
from builder.core.context import Context, make_context
from builder.core.errors import UsageError
from builder.core.progress import Steps
from builder.spec import loader

T = TypeVar("T")

# Logs (CI, pipes) are not terminals: give tables room instead of rich's 80 columns.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

ENGINE_OPTION = click.option("--engine", type=click.Choice(["auto", "podman", "docker"]), default="auto",
                             show_default=True, help="OCI engine: podman CLI, or the docker SDK "
                             "(auto: docker when DOCKER_HOST is set).")
TLS_VERIFY_OPTION = click.option("--tls-verify/--no-tls-verify", default=None,
                                 help="Verify the registry's TLS certificate (default: on, off for "
                                      "127.0.0.1/localhost).")


def registry_auth_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--authfile, --username and --password-stdin (builder.core.secrets): never a password on the command line."""
    f = click.option("--password-stdin", is_flag=True,
                     help="Read the registry password (for --username) from the first line of stdin.")(f)
    f = click.option("--username", metavar="USER", help="Registry user; the password comes from stdin.")(f)
    return click.option("--authfile", type=click.Path(path_type=Path, dir_okay=False),
                        help="containers-auth.json with the registry's credentials (podman login writes one). "
                             "Or: --username with --password-stdin, or $KILN_REGISTRY_CREDS=USER:PASSWORD. With "
                             "none of them, podman and skopeo use their own ($REGISTRY_AUTH_FILE, podman login).")(f)


@contextlib.contextmanager
def registry_auth(ctx: Context, registry: str, authfile: Path | None, username: str | None,
                  password_stdin: bool) -> Iterator[Path | None]:
    """The auth file podman and skopeo get for REGISTRY (made from credentials, removed afterwards)."""
    from builder.core.secrets import auth_file, registry_credentials

    creds = registry_credentials(authfile=authfile, username=username, password_stdin=password_stdin)
    with auth_file(registry, creds, ctx.state.tmp_dir) as path:
        yield path


def load(ref: str) -> loader.HardwareClass:
    return loader.load_class(ref)


def source_of(ref: str) -> str:
    """The class file as the record names it: relative to the project when it is inside."""
    path = loader.resolve_class_path(ref)
    try:
        return str(path.resolve().relative_to(paths.project_root()))
    except ValueError:
        return str(path)


def cli_context(engine: str = "auto") -> Context:
    """The one Context of a `kiln` run: the project's state dir, the chosen engine, a timer on stderr."""
    return make_context(engine, steps=Steps())


def checked(option: str, check: Callable[[str], T], value: str) -> T:
    """CHECK(VALUE) (a builder.core.safe check or parser); a usage error naming the option when it refuses."""
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
