"""`kiln registry start|status|stop`: a local OCI registry on 127.0.0.1, state in .kiln/registry/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from builder.cli.common import cli_context
from builder.core.errors import UsageError


@click.group("registry")
def registry_group() -> None:
    """A local OCI registry (Debian's docker-registry) on 127.0.0.1, state in .kiln/registry/."""


def _registry_root() -> Path:
    return cli_context().state.registry_dir


@registry_group.command("start")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--tls", is_flag=True, help="Serve HTTPS with a self-signed certificate for 127.0.0.1.")
@click.option("--htpasswd", "user", metavar="USER", help="Require this user (htpasswd, bcrypt); the password "
              "comes from $KILN_REGISTRY_PASSWORD or, with --password-stdin, the first line of stdin, never "
              "from the command line.")
@click.option("--password-stdin", is_flag=True, help="Read --htpasswd's password from stdin.")
@click.option("--lookaside-port", type=click.IntRange(0, 65535), default=5080, show_default=True,
              help="Also serve the signature directory (.kiln/signatures) over HTTP here; 0: do not.")
def registry_start(port: int, tls: bool, user: str | None, password_stdin: bool, lookaside_port: int) -> None:
    """Start the registry (and the signature server devices read) in the background."""
    from builder.core.secrets import REGISTRY_PASSWORD_ENV, register
    from builder.release.registry import start_registry
    from builder.release.signing import finalize_lookaside_dir

    htpasswd = None
    if user is not None:
        if ":" in user:
            raise UsageError("--htpasswd takes the user only: a password on the command line is visible to every "
                             f"user of this machine; give it in ${REGISTRY_PASSWORD_ENV} or with --password-stdin")
        password = sys.stdin.readline().rstrip("\r\n") if password_stdin else \
            os.environ.get(REGISTRY_PASSWORD_ENV, "")
        if not password:
            raise UsageError(f"--htpasswd {user}: no password (set ${REGISTRY_PASSWORD_ENV} or pass --password-stdin)")
        register(password)
        htpasswd = f"{user}:{password}"
    elif password_stdin:
        raise UsageError("--password-stdin goes with --htpasswd USER")

    sigs = finalize_lookaside_dir(cli_context().state) if lookaside_port else None
    info = start_registry(_registry_root(), port=port, tls=tls, htpasswd=htpasswd, lookaside_dir=sigs,
                          lookaside_port=lookaside_port or None)
    click.echo(f"registry at {info.address} (pid {info.pid}, {info.url}); data in {info.root / 'data'}; "
               f"push with: kiln push CLASS {info.address}")
    if info.lookaside:
        click.echo(f"signatures from {sigs} at {info.lookaside} (pid {info.lookaside_pid})")


@registry_group.command("status")
def registry_status() -> None:
    """Say whether the registry runs and where."""
    from builder.release.registry import RegistryPaths, read_info

    info = read_info(RegistryPaths(_registry_root()))
    if info is None:
        click.echo("no Kiln registry is running")
        sys.exit(1)
    click.echo(f"registry at {info.address} (pid {info.pid}, {info.url})")


@registry_group.command("stop")
def registry_stop() -> None:
    """Stop the registry (its data stays in .kiln/registry/data)."""
    from builder.release.registry import stop_registry

    info = stop_registry(_registry_root())
    click.echo(f"stopped the registry at {info.address}" if info else "no Kiln registry was running")
