"""What every command module shares: the consoles, loading a class, common options, the Context."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

import click
from rich.console import Console

from builder import loader, paths
from builder.context import Context, make_context
from builder.errors import UsageError
from builder.progress import Steps

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
    """CHECK(VALUE) (a builder.safe check or parser); a usage error naming the option when it refuses."""
    try:
        return check(value)
    except ValueError as exc:
        raise UsageError(f"{option}: {exc}") from None
