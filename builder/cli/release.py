"""`kiln keys`, `kiln release`, `kiln policy`: signing keys, signed releases, device trust files."""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.cli.common import (
    ENGINE_OPTION,
    TLS_VERIFY_OPTION,
    cli_context,
    err_console,
    load,
    registry_auth,
    registry_auth_options,
    source_of,
)


@click.group("keys")
def keys_group() -> None:
    """Release signing keys (GPG, containers simple signing)."""


@keys_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def keys_init(directory: Path) -> None:
    """Create a signing key in DIRECTORY (never inside the project); print its fingerprint.

    DIRECTORY/gnupg is the private GNUPGHOME; DIRECTORY/release-key.asc is the public key
    that images bake as /usr/lib/kiln/release-key.asc. The key (and its TUF keys) get the
    passphrase in $KILN_KEY_PASSPHRASE_FILE (a file) or $KILN_KEY_PASSPHRASE; signing later
    reads it from there, or gpg-agent.
    """
    from builder.secrets import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV
    from builder.signing import describe_key, make_signing_key

    key = make_signing_key(directory)
    click.echo(describe_key(key))
    if not json.loads((key.directory / "key.json").read_text()).get("passphrase"):
        err_console.print(f"warning: the key has no passphrase (set ${PASSPHRASE_FILE_ENV} or ${PASSPHRASE_ENV} "
                          "before kiln keys init to give it one)", markup=False)
    click.echo(f"next: kiln release CLASS --version V --channel stable --registry HOST:PORT --key {key.directory}")


@keys_group.command("show")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def keys_show(directory: Path) -> None:
    """Print the fingerprint and paths of the key in DIRECTORY."""
    from builder.signing import describe_key, read_signing_key

    click.echo(describe_key(read_signing_key(directory)))


@click.command("policy")
@click.argument("cls", metavar="CLASS")
@click.option("--key", "key_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Signing key directory (kiln keys init).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Write the files under this root (usr/lib/kiln/...) instead of printing policy.json.")
def policy_cmd(cls: str, key_dir: Path, output: Path | None) -> None:
    """Render what a CLASS image needs to verify releases: policy.json and the public key."""
    from builder.signing import finalize_device_files, read_signing_key, render_policy

    hc = load(cls)
    key = read_signing_key(key_dir)
    if output is None:
        click.echo(render_policy(hc.name), nl=False)
        return
    for rel, data in finalize_device_files(hc.name, key).items():
        dest = output / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        click.echo(f"wrote {dest}")


@click.command("release")
@click.argument("cls", metavar="CLASS")
@click.option("--version", "version", required=True, help="Release version (built now unless built already).")
@click.option("--channel", default=None, help="Channel tag to move (default: the class's rollout.channel).")
@click.option("--registry", required=True, metavar="HOST:PORT[/PATH]", help="Registry to push to.")
@click.option("--key", "key_dir", type=click.Path(path_type=Path, file_okay=False),
              help="Signing key directory (kiln keys init; default $KILN_SIGNING_KEY, or a development "
                   "class's per-checkout key).")
@click.option("--lookaside", type=click.Path(path_type=Path, file_okay=False),
              help="Signature directory that devices read over HTTP (default .kiln/signatures).")
@click.option("--rebuild", is_flag=True, help="Build even when VERSION was built already.")
@ENGINE_OPTION
@TLS_VERIFY_OPTION
@registry_auth_options
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Directory with the registry's CA certificate (*.crt) and client certificates.")
@click.option("--json", "as_json", is_flag=True, help="Print the build record as JSON.")
def release_cmd(cls: str, version: str, channel: str | None, registry: str, key_dir: Path | None,
                lookaside: Path | None, rebuild: bool, engine: str, tls_verify: bool | None,
                authfile: Path | None, username: str | None, password_stdin: bool, cert_dir: Path | None,
                as_json: bool) -> None:
    """Build (or take the built) CLASS VERSION, sign it, push it, move the channel tag.

    The image goes to REGISTRY/kiln/CLASS:staging-VERSION first; only after its
    signature is stored and verifies under the device policy do :VERSION and then
    :CHANNEL point at it. A failed signing leaves no tag that devices take.
    """
    from builder.release import make_release
    from builder.signing import resolve_signing_key

    hc = load(cls)
    key = resolve_signing_key(hc, key_dir)  # fail before a long build
    ctx = cli_context(engine)
    with registry_auth(ctx, registry, authfile, username, password_stdin) as auth:
        record = make_release(ctx, hc, source=source_of(cls), version=version, registry=registry,
                              key=key, channel=channel, lookaside_dir=lookaside, rebuild=rebuild,
                              tls_verify=tls_verify, authfile=auth, cert_dir=cert_dir)
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    sig = record["signatures"][-1]
    for pushed in record["pushed"]:
        click.echo(f"pushed {pushed['ref']} -> {pushed['digest']}")
    click.echo(f"signed by {sig['fingerprint']} as {sig['identity']}; signature {sig['path']}")
    click.echo(f"serve {sig['lookaside']} over HTTP as the devices' lookaside URL")

