"""`kiln channel`: the TUF metadata that says which releases a class's devices may install."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from builder.cli.common import cli_context

KEY_OPTION = click.option("--key", "key_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
                          help="Key directory (kiln keys init): its tuf/ keys sign.")
LOOKASIDE_OPTION = click.option("--lookaside", type=click.Path(path_type=Path, file_okay=False),
                                help="Directory served to devices (default: the state dir's signatures/, what "
                                     "`kiln registry start` serves); the repository is its tuf/.")


def lookaside_dir(lookaside: Path | None) -> Path:
    from builder.release.signing import finalize_lookaside_dir

    return (lookaside or finalize_lookaside_dir(cli_context().state)).absolute()


@click.group("channel")
def channel_group() -> None:
    """Trusted channels: TUF metadata naming every release, its withdrawal, expiry and key rotation.

    `kiln release` names each release in its channel; devices whose image carries the root
    (/usr/lib/kiln/tuf/root.json) install only what fresh, verified metadata names.
    Timestamp metadata lives a day and snapshot a week: run `kiln channel refresh` from a
    timer or CI, or devices report a stale channel and install nothing.
    """


@channel_group.command("init")
@KEY_OPTION
@LOOKASIDE_OPTION
def channel_init(key_dir: Path, lookaside: Path | None) -> None:
    """Create the repository from KEY's root (made by kiln keys init; added to an older key directory)."""
    from builder.core.secrets import key_passphrase
    from builder.keys.tuf_keys import make_trust_keys, trust_root
    from builder.release.trust import open_repository

    make_trust_keys(key_dir, key_passphrase())
    repo = open_repository(lookaside_dir(lookaside), key_dir)
    repo.init(trust_root(key_dir) or b"")
    click.echo(f"repository {repo.meta_dir} (root v1 = {key_dir / 'tuf' / 'root.json'}, which images bake)")


@channel_group.command("status")
@click.argument("cls", metavar="[CLASS]", required=False)
@LOOKASIDE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def channel_status(cls: str | None, lookaside: Path | None, as_json: bool) -> None:
    """Releases per class and channel (withdrawn ones marked) and each role's version and expiry."""
    from builder.release.trust import open_repository

    repo = open_repository(lookaside_dir(lookaside), None)
    status = repo.status(cls)
    if as_json:
        click.echo(json.dumps(status, indent=2, sort_keys=True))
        return
    for role, info in status["roles"].items():
        click.echo(f"{role:9} v{info['version']:<4} expires {info['expires']}")
    for r in status["releases"]:
        mark = f"  WITHDRAWN: {r['withdrawn']['reason']}" if r["withdrawn"] else ""
        click.echo(f"{r['class']}/{r['channel']}/{r['version']}  {r['digest'][:19]}  {r['compatible']}{mark}")
    if not status["releases"]:
        click.echo("no releases" + (f" of {cls}" if cls else ""))


@channel_group.command("withdraw")
@click.argument("cls", metavar="CLASS")
@click.argument("version")
@click.option("--channel", default=None, help="Channel (default: the class's rollout.channel).")
@click.option("--reason", required=True, help="Why: devices report it.")
@KEY_OPTION
@LOOKASIDE_OPTION
def channel_withdraw(cls: str, version: str, channel: str | None, reason: str, key_dir: Path,
                     lookaside: Path | None) -> None:
    """Withdraw CLASS VERSION: no device installs it, devices running it move to the next good release."""
    from builder.cli.common import load
    from builder.release.flow import finalize_channel
    from builder.release.trust import open_repository

    channel = finalize_channel(load(cls).spec.rollout.channel, channel)
    repo = open_repository(lookaside_dir(lookaside), key_dir)
    repo.withdraw(cls, channel, version, reason)
    click.echo(f"withdrew {cls} {version} from {channel}: targets v{repo.latest('targets').signed.version}")


@channel_group.command("refresh")
@KEY_OPTION
@LOOKASIDE_OPTION
@click.option("--targets", is_flag=True, help="Re-sign targets too (needs the targets key).")
def channel_refresh(key_dir: Path, lookaside: Path | None, targets: bool) -> None:
    """New snapshot and timestamp with fresh expiry (the online key): run it before the timestamp expires."""
    from builder.release.trust import open_repository

    repo = open_repository(lookaside_dir(lookaside), key_dir)
    repo.refresh(targets=targets)
    ts = repo.latest("timestamp").signed
    click.echo(f"timestamp v{ts.version}, expires {ts.expires:%Y-%m-%dT%H:%M:%SZ}")


@channel_group.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets", "online"]))
@click.option("--new-key", "new_dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Directory whose tuf/<role>.pem is the new key (kiln keys init NEW makes one); without it, "
                   "targets and online get a new key made here (a leaked key: one command).")
@click.option("--new-root", "new_roots", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="ROLE root: the new root's directories (kiln keys root init), its threshold of them.")
@click.option("--root", "root_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
              help="The current root's directories (kiln keys root init), its threshold of them; without it, "
                   "KEY's own tuf/root.pem.")
@KEY_OPTION
@LOOKASIDE_OPTION
def channel_rotate(role: str, new_dir: Path | None, new_roots: tuple[Path, ...], root_dirs: tuple[Path, ...],
                   key_dir: Path, lookaside: Path | None) -> None:
    """Replace ROLE's key: root N+1, signed by the current root's threshold (and the new root's, for root).
    Devices follow without a reflash. KEY's tuf/ then holds the new key and root (what new images bake).

    A leaked online key: `kiln channel rotate online --key KEY --root R1 --root R2` makes a new one, names it in
    root N+1 and signs snapshot and timestamp with it; what the old key signs is refused from then on. Give the
    fleet service the new key (`kiln keys export KEY --for fleet`)."""
    import os
    import tempfile

    from builder.core.errors import UsageError
    from builder.keys.root_keys import load_root_keys
    from builder.keys.tuf_keys import KEY_FILES, ROOT_FILE, TUF_DIR, TrustKeys, make_key_file
    from builder.release.trust import open_repository

    roots = load_root_keys(list(root_dirs)) if root_dirs else None
    repo = open_repository(lookaside_dir(lookaside), key_dir, with_root=roots is None, roots=roots)
    staged: Path | None = None
    if role == "root":
        if bool(new_dir) == bool(new_roots):
            raise UsageError("rotating root: give the new root with --new-root DIR (repeat it), or --new-key DIR "
                             "(its tuf/root.pem)")
        new_keys = TrustKeys({}, load_root_keys(list(new_roots))) if new_roots else \
            TrustKeys.load(new_dir, only=("root",))  # type: ignore[arg-type]
    elif new_dir is not None:
        new_keys = TrustKeys.load(new_dir, only=(role,))
    else:  # a new key made here, in place once root N+1 names it
        staged = Path(tempfile.mkdtemp(prefix=f".{role}.", dir=key_dir / TUF_DIR))
        make_key_file(staged / KEY_FILES[role], from_env=True)
        new_keys = TrustKeys({role: load_signer_of(staged / KEY_FILES[role])})
    try:
        version = repo.rotate(role, new_keys)
        if role != "root":
            source = staged / KEY_FILES[role] if staged else new_dir / TUF_DIR / KEY_FILES[role]  # type: ignore[operator]
            target = key_dir / TUF_DIR / KEY_FILES[role]
            shutil.copy2(source, target.with_name(f".{target.name}.new"))
            os.replace(target.with_name(f".{target.name}.new"), target)
        elif new_dir is not None:
            shutil.copy2(new_dir / TUF_DIR / KEY_FILES["root"], key_dir / TUF_DIR / KEY_FILES["root"])
        elif (key_dir / TUF_DIR / KEY_FILES["root"]).exists():
            (key_dir / TUF_DIR / KEY_FILES["root"]).unlink()  # the root is offline from now on
        shutil.copy2(repo.meta_dir / f"{version}.root.json", key_dir / TUF_DIR / ROOT_FILE)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    click.echo(f"root v{version}: {role} key replaced; {key_dir / TUF_DIR / ROOT_FILE} updated")


def load_signer_of(path: Path):  # type: ignore[no-untyped-def]
    from builder.keys.signer import load_signer

    return load_signer(path)
