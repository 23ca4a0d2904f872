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
from builder.core import paths


@click.group("keys")
def keys_group() -> None:
    """Release keys: the GPG image-signing key and the TUF keys (targets, online, rollout) in one directory, and
    the TUF root kept offline (`kiln keys root`)."""


ROOT_OPTION = click.option("--root", "root_dirs", multiple=True, type=click.Path(path_type=Path, file_okay=False),
                           help="A root directory from `kiln keys root init` (one holder's keys); repeat it until "
                                "the root's threshold of keys is given.")


def root_keys_of(root_dirs: tuple[Path, ...]):  # type: ignore[no-untyped-def]
    from builder.keys.root_keys import load_root_keys

    return load_root_keys(list(root_dirs)) if root_dirs else None


@keys_group.group("root")
def keys_root_group() -> None:
    """The TUF root, offline: N keys of which a threshold sign which keys hold every other role."""


@keys_root_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--keys", "count", default=3, show_default=True, type=click.IntRange(1, 9),
              help="How many root keys (give each to its own holder, on its own medium).")
@click.option("--threshold", default=2, show_default=True, type=click.IntRange(1, 9),
              help="How many of them must sign a root.")
def keys_root_init(directory: Path, count: int, threshold: int) -> None:
    """Make the root keys in DIRECTORY (new; on a machine of their own): root-1.pem ... root-N.pem, encrypted
    with $KILN_KEY_PASSPHRASE_FILE's passphrase (required: a root key is never without one), and
    root-policy.json. Then `kiln keys init KEYDIR --root DIRECTORY` makes the keys CI and the fleet hold."""
    from builder.core.secrets import key_passphrase
    from builder.keys.root_keys import make_root_keys

    made = make_root_keys(directory, count=count, threshold=threshold, passphrase=key_passphrase())
    for path in made:
        click.echo(f"root key {path}")
    click.echo(f"threshold: {threshold} of {count}; copy each root-N.pem with root-policy.json to its holder's "
               "medium, and keep them off every machine CI or the fleet service runs on")


@keys_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--no-passphrase", is_flag=True,
              help="Make the keys without a passphrase (a throwaway or test key); without it, a passphrase is "
                   "required.")
@ROOT_OPTION
def keys_init(directory: Path, no_passphrase: bool, root_dirs: tuple[Path, ...]) -> None:
    """Create a signing key in DIRECTORY (never inside the project); print its fingerprint.

    DIRECTORY/gnupg is the private GNUPGHOME; DIRECTORY/release-key.asc is the public key
    that images bake as /usr/lib/kiln/release-key.asc. The key (and its TUF keys) get the
    passphrase in $KILN_KEY_PASSPHRASE_FILE (a file) or $KILN_KEY_PASSPHRASE; signing later
    reads it from there, or gpg-agent. Without one, it refuses unless --no-passphrase says so.

    With --root (the offline root's directories, `kiln keys root init`), root v1 names the
    root's keys and is signed by those given; without, DIRECTORY/tuf/root.pem is a root key of
    its own (a development or test key: `kiln keys export` never carries it).
    """
    from builder.core.errors import UsageError
    from builder.core.secrets import PASSPHRASE_ENV, PASSPHRASE_FILE_ENV, key_passphrase
    from builder.keys.release_key import describe_key, make_signing_key

    phrase = key_passphrase()
    if phrase is None and not no_passphrase:
        raise UsageError("no passphrase for the new keys: the release key and the TUF root would be readable by "
                         "whoever copies the directory",
                         hint=f"set ${PASSPHRASE_FILE_ENV} (a file) or ${PASSPHRASE_ENV}, or give --no-passphrase "
                              "for a key that needs none")
    if phrase is not None and no_passphrase:
        raise UsageError(f"--no-passphrase, but ${PASSPHRASE_FILE_ENV} or ${PASSPHRASE_ENV} gives one")
    key = make_signing_key(directory, roots=root_keys_of(root_dirs))
    click.echo(describe_key(key))
    if not root_dirs:
        err_console.print(f"note: the TUF root key is {key.directory}/tuf/root.pem (no --root): keep it off CI and "
                          "the fleet service; for a production root, see `kiln keys root init`", markup=False)
    if not json.loads((key.directory / "key.json").read_text()).get("passphrase"):
        err_console.print("warning: the keys have no passphrase (--no-passphrase)", markup=False)
    click.echo(f"next: kiln release CLASS --version V --channel stable --registry HOST:PORT --key {key.directory}")


@keys_group.group("secureboot")
def keys_secureboot_group() -> None:
    """Secure Boot: Kiln's own PK, KEK and db beside a release key (DIR/secureboot). db signs systemd-boot and
    every UKI a build of a class with spec.secureBoot makes; PK and KEK own the devices' firmware and stay
    offline (`kiln keys export` leaves them out)."""


@keys_secureboot_group.command("init")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def keys_secureboot_init(directory: Path) -> None:
    """Make DIRECTORY/secureboot/{PK,KEK,db}.{key,crt} for the release key in DIRECTORY (a key made before
    verified boot; `kiln keys init` makes them with every new key). The keys get the release key's
    passphrase ($KILN_KEY_PASSPHRASE_FILE or $KILN_KEY_PASSPHRASE)."""
    from builder.core.secrets import key_passphrase
    from builder.keys.release_key import is_development_key, read_signing_key
    from builder.keys.secureboot import SECUREBOOT_DIR, make_secureboot_keys

    key = read_signing_key(directory)
    development = is_development_key(key)
    phrase = None if development else key_passphrase()
    made = make_secureboot_keys(key.directory / SECUREBOOT_DIR, phrase,
                                common_name="Kiln development" if development else "Kiln")
    for role in ("PK", "KEK", "db"):
        click.echo(f"{role:<3} {made.cert(role)}  sha256 {made.fingerprint(role)}")
    if phrase is None and not development:
        err_console.print("warning: the Secure Boot keys have no passphrase", markup=False)
    click.echo(f"keep {made.key('PK')} and {made.key('KEK')} offline; db signs builds")


@keys_group.command("show")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def keys_show(directory: Path) -> None:
    """Print the fingerprint and paths of the key in DIRECTORY."""
    from builder.keys.release_key import describe_key, read_signing_key

    click.echo(describe_key(read_signing_key(directory)))


@keys_group.command("export")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@click.option("--for", "holder", type=click.Choice(["ci", "fleet"]), default="ci", show_default=True,
              help="ci: the GPG key and the targets, online and rollout keys; fleet: the online and rollout keys "
                   "only (what `kiln fleet serve --key` signs with).")
def keys_export(directory: Path, holder: str) -> None:
    """Print the key directory as one base64 line (a gzipped tar), for a CI secret (KILN_RELEASE_KEY) or the
    fleet service's host. No root key is ever in it.

    Its private keys stay protected by the key's passphrase, if it has one (give that as a secret of its own)."""
    from builder.keys.release_key import export_key

    data, left = export_key(directory, holder)
    for path in left:
        err_console.print(f"left out {path}: a root key stays offline", markup=False)
    click.echo(data)


@keys_group.command("import")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
def keys_import(directory: Path) -> None:
    """Unpack $KILN_RELEASE_KEY (from `kiln keys export`) into DIRECTORY (new, mode 0700): CI's release key."""
    from builder.keys.release_key import describe_key, import_key

    click.echo(describe_key(import_key(directory)))


@click.command("policy")
@click.argument("cls", metavar="CLASS")
@click.option("--key", "key_dir", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Signing key directory (kiln keys init).")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Write the files under this root (usr/lib/kiln/...) instead of printing policy.json.")
def policy_cmd(cls: str, key_dir: Path, output: Path | None) -> None:
    """Render what a CLASS image needs to verify releases: policy.json and the public key."""
    from builder.keys.device_files import finalize_device_files, render_policy
    from builder.keys.release_key import read_signing_key

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
    :CHANNEL point at it. A failed signing leaves no tag that devices take. The signed
    SBOM and provenance go beside the image (`kiln verify` checks them), and the
    release report is written to build/CLASS/VERSION/release.html (`kiln report`).
    """
    from builder.keys.release_key import resolve_signing_key
    from builder.release.flow import make_release
    from builder.release.report import write_report

    hc = load(cls)
    key = resolve_signing_key(hc, key_dir)  # fail before a long build
    ctx = cli_context(engine)
    with registry_auth(ctx, registry, authfile, username, password_stdin) as auth:
        record = make_release(ctx, hc, source=source_of(cls), version=version, registry=registry,
                              key=key, channel=channel, lookaside_dir=lookaside, rebuild=rebuild,
                              tls_verify=tls_verify, authfile=auth, cert_dir=cert_dir)
    report = write_report([cls], version, paths.record_path(cls, version).with_name("release.html"))
    if as_json:
        click.echo(json.dumps(record, indent=2, sort_keys=True))
        return
    sig = record["signatures"][-1]
    for pushed in record["pushed"]:
        click.echo(f"pushed {pushed['ref']} -> {pushed['digest']}")
    click.echo(f"signed by {sig['fingerprint']} as {sig['identity']}; signature {sig['path']}")
    click.echo(f"serve {sig['lookaside']} over HTTP as the devices' lookaside URL")
    att = record.get("attestations") or {}
    if att:
        click.echo(f"SBOM {att['sbom']['tag']} ({att['sbomSummary']['packages']} packages, "
                   f"{att['sbomSummary']['wheels']} wheels) and provenance {att['att']['tag']}, both signed")
    click.echo(f"release report {report}")


@click.command("report")
@click.argument("classes", metavar="CLASS...", nargs=-1, required=True)
@click.option("--version", "version", required=True, help="The released version.")
@click.option("--previous", default=None, help="The version devices run now (default: the newest released one "
              "below VERSION).")
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="The HTML file (default build/CLASS/VERSION/release.html, for one class).")
def report_cmd(classes: tuple[str, ...], version: str, previous: str | None, output: Path | None) -> None:
    """Write the release report: one self-contained HTML file for VERSION of each CLASS, from the build records."""
    from builder.core.errors import UsageError
    from builder.release.report import write_report

    if output is None:
        if len(classes) != 1:
            raise UsageError("several classes go in one file: name it with -o FILE")
        output = paths.record_path(load(classes[0]).name, version).with_name("release.html")
    names = [load(c).name for c in classes]
    click.echo(f"wrote {write_report(names, version, output, previous)}")



@click.command("verify")
@click.argument("image")
@click.option("--key", "key_dir", type=click.Path(path_type=Path, file_okay=False),
              help="The release key directory (its public half, release-key.asc, is used).")
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="The release public key (release-key.asc), for an auditor without the key directory.")
@click.option("--lookaside", default=None, metavar="DIR|URL",
              help="Where the signatures are: a directory or the http(s) URL devices read (default .kiln/signatures).")
@TLS_VERIFY_OPTION
@registry_auth_options
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False),
              help="Directory with the registry's CA certificate.")
@click.option("--json", "as_json", is_flag=True, help="Print every check as JSON.")
def verify_cmd(image: str, key_dir: Path | None, public_key: Path | None, lookaside: str | None,
               tls_verify: bool | None, authfile: Path | None, username: str | None, password_stdin: bool,
               cert_dir: Path | None, as_json: bool) -> None:
    """Check IMAGE (REGISTRY/kiln/CLASS:TAG or @sha256:DIGEST): its signature, and its SBOM and provenance
    (their signatures, that they name this digest, their contents). Exit 11 when any check fails."""
    from builder.core.errors import UsageError, VerifyFailed
    from builder.release.attest import verify_image
    from builder.release.publish import finalize_tls_verify
    from builder.release.signing import Access, finalize_lookaside_dir

    if (key_dir is None) == (public_key is None):
        raise UsageError("give the release key: --key DIR or --public-key FILE (one of them)")
    pub = public_key if public_key is not None else Path(key_dir or ".") / "release-key.asc"
    if not pub.is_file():
        raise UsageError(f"{pub}: no release public key there")
    ctx = cli_context()
    registry = image.removeprefix("docker://").split("/", 1)[0]
    where = lookaside or str(finalize_lookaside_dir(ctx.state))
    with registry_auth(ctx, registry, authfile, username, password_stdin) as auth:
        access = Access(finalize_tls_verify(registry, tls_verify), auth, cert_dir)
        report = verify_image(image, public_key=pub, lookaside=where, access=access, state=ctx.state)
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        click.echo(f"{report['image']} (tag {report['tag'] or '?'}), release key {report['fingerprint'][-16:]}")
        for c in report["checks"]:
            click.echo(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['what']}: {c['detail']}")
        if report["sbom"]:
            s = report["sbom"]
            click.echo(f"  SBOM: {s['components']} components "
                       f"({', '.join(f'{n} {t}' for t, n in s['byType'].items())}); models {', '.join(s['models'])}")
    failed = [c["what"] for c in report["checks"] if not c["ok"]]
    if not report["ok"]:
        raise VerifyFailed(f"{report['image']}: " + (", ".join(failed) if failed else "checks missing"))
