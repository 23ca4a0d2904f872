"""`kiln base|build|push|demo`: images into Kiln's store and out to registries."""

from __future__ import annotations

import json
from pathlib import Path

import click

from builder.cli.common import (
    ENGINE_OPTION,
    TLS_VERIFY_OPTION,
    checked,
    cli_context,
    load,
    registry_auth,
    registry_auth_options,
    source_of,
)
from builder.core import paths
from builder.image import render
from builder.spec import loader


@click.command("base")
@click.option("--release", default="bookworm", show_default=True, help="Debian release.")
@click.option("--arch", default="x86_64", show_default=True, help="Architecture (x86_64, aarch64).")
@click.option("--mirror", help="Debian mirror (default deb.debian.org).")
@click.option("--snapshot", help="snapshot.debian.org timestamp (YYYYMMDDTHHMMSSZ) for a pinned base.")
@click.option("--force", is_flag=True, help="Rebuild even when the cached base is current.")
@click.option("--class", "cls", metavar="CLASS", help="The base CLASS builds FROM (its release, components and "
              "snapshot; its fallbackMirror when the snapshot is unreachable); overrides the other options.")
@ENGINE_OPTION
def base_cmd(release: str, arch: str, mirror: str | None, snapshot: str | None, force: bool,
             cls: str | None, engine: str) -> None:
    """Bootstrap the offline Debian base (mmdebstrap) into Kiln's container store; cached."""
    from builder.base.bootstrap import finalize_base_mirror, make_base, make_base_for_class
    from builder.core.safe import snapshot as check_snapshot

    if cls:
        hc = load(cls)
        where = finalize_base_mirror(hc)
        if where.fallback:
            click.echo(f"note: {hc.name}: {where.note}", err=True)
        image = make_base_for_class(cli_context(engine), hc, where, force=force)
        click.echo(f"{image.ref} {image.image_id} (kernel {image.kernel}; {'built' if image.built else 'cached'}; "
                   f"mirror {where.url}; tarball {image.tarball})")
        return
    if snapshot:
        checked("--snapshot", check_snapshot, snapshot)
    image = make_base(cli_context(engine), release, arch, mirror=mirror, snapshot=snapshot, force=force)
    click.echo(f"{image.ref} {image.image_id} (kernel {image.kernel}; "
               f"{'built' if image.built else 'cached'}; tarball {image.tarball})")


@click.command("build")
@click.argument("cls", metavar="CLASS")
@click.option("--version", "version", default=render.DEFAULT_VERSION, show_default=True,
              help="Release version (image tag, release.json, labels).")
@click.option("--revision", help="Source revision (default: the git commit of the project).")
@ENGINE_OPTION
@click.option("--push", "push_to", metavar="REGISTRY", help="Push after building (host:port[/path]).")
@TLS_VERIFY_OPTION
@click.option("--no-cache", is_flag=True, help="Ignore cached layers (a cold build).")
@click.option("--sign-key", type=click.Path(path_type=Path, file_okay=False),
              help="Release key the image trusts for updates (kiln keys init; default $KILN_SIGNING_KEY, or a "
                   "development class's per-checkout key). With --push, also signs.")
@click.option("--json", "as_json", is_flag=True, help="Print the build record as JSON.")
def build_cmd(cls: str, version: str, revision: str | None, engine: str, push_to: str | None,
              tls_verify: bool | None, no_cache: bool, sign_key: Path | None, as_json: bool) -> None:
    """Build CLASS into an OCI image tagged localhost/kiln/CLASS:VERSION; record it in build.json.

    Optimizes and gates the models first (a refused model stops the build, exit 5),
    bootstraps the offline base when it is missing, lints the image as its last step.
    """
    from builder.core.records import describe
    from builder.image.build import build_class
    from builder.keys.release_key import read_signing_key
    from builder.release.publish import push_signed

    hc = load(cls)
    ctx = cli_context(engine)
    record = build_class(ctx, hc, source=source_of(cls), version=version, revision=revision, no_cache=no_cache,
                         sign_key=sign_key)
    if push_to:
        key = read_signing_key(Path(record["releaseKey"]["directory"]))
        record = push_signed(ctx, hc.name, version, push_to, key=key, tls_verify=tls_verify)
    click.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else describe(record))


@click.command("push")
@click.argument("cls", metavar="CLASS")
@click.argument("registry")
@click.option("--version", "version", default=render.DEFAULT_VERSION, show_default=True,
              help="The built version to push.")
@ENGINE_OPTION
@TLS_VERIFY_OPTION
@registry_auth_options
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Directory with the ca.crt of a registry with its own CA (podman).")
@click.option("--sign-by", type=click.Path(path_type=Path, file_okay=False),
              help="Sign with this release key (kiln keys init) and publish the signature in the lookaside dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the build record as JSON.")
def push_cmd(cls: str, registry: str, version: str, engine: str, tls_verify: bool | None,
             authfile: Path | None, username: str | None, password_stdin: bool, cert_dir: Path | None,
             sign_by: Path | None, as_json: bool) -> None:
    """Push a built CLASS VERSION to REGISTRY/kiln/CLASS:VERSION; records the pushed digest.

    With --sign-by, the image goes to a staging tag first and :VERSION moves only
    after its signature is stored (see `kiln release`)."""
    from builder.keys.release_key import read_signing_key
    from builder.release.publish import push_build, push_signed

    ctx = cli_context(engine)
    with registry_auth(ctx, registry, authfile, username, password_stdin) as auth:
        if sign_by is not None:
            from builder.keys.release_key import check_key_for_class

            key = read_signing_key(sign_by)
            check_key_for_class(load(cls), key)
            record = push_signed(ctx, cls, version, registry, key=key, tls_verify=tls_verify, authfile=auth,
                                 cert_dir=cert_dir)
        else:
            record = push_build(ctx, cls, version, registry, tls_verify=tls_verify, authfile=auth,
                                cert_dir=cert_dir)
    pushed = record["pushed"][-1]
    click.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else
               f"pushed {pushed['byDigest']} (local image {record['image']['id'][:19]})")


@click.command()
@click.option("--class", "cls", default="qemu-x86_64", show_default=True, help="The class to run.")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Version to build and boot.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="QEMU accelerator (auto: KVM when it can boot OVMF here, else TCG).")
@click.option("--timeout", type=float, default=None,
              help="Seconds to wait for the booted device to pass its health check (default: 900, times "
                   "the emulation allowance of an arm64 class on an x86_64 host).")
def demo(cls: str, version: str, accel: str, timeout: float | None) -> None:
    """The main job: validate, build CLASS (model gated), make its A/B disk, boot it, show it healthy."""
    from builder.core.records import describe
    from builder.disk import assemble, vm
    from builder.image.build import build_class

    ctx = cli_context()
    steps = ctx.steps
    with steps.step("validate every class"):
        for name in loader.known_classes():
            load(name)
            click.echo(f"ok  {name}")
    hc = load(cls)
    record = build_class(ctx, hc, source=source_of(cls), version=version)
    click.echo(describe(record))
    made = assemble.make_disk(ctx, record["image"]["ref"], version=version)
    click.echo(f"disk: {made.output}")
    key = paths.ssh_key_path(hc.name)
    config = vm.VMConfig(disk=Path(made.output), accel=vm.Accel(accel), snapshot=True,
                         ssh_key=key if key.is_file() else None)
    with steps.step(f"boot {cls} {version} in QEMU and wait for its health check"), vm.start_vm(config) as machine:
        healthy = machine.wait_for_healthy(timeout or vm.finalize_boot_timeout(hc.spec.architecture))
        click.echo(f"healthy {healthy:.1f} s after QEMU started ({machine.accel.value})")
        report = machine.guest_exec("kiln-agent status --json", check=False).stdout
        click.echo(summarize_device(report))
        machine.poweroff()
    click.echo(f"demo: {cls} {version} built, gated, flashed and booted healthy; durations "
               + ", ".join(f"{k} {v:.1f} s" for k, v in steps.summary().items()))


def summarize_device(text: str) -> str:
    """What the device says of itself (`kiln-agent status --json`): its release, slot, root and health check."""
    try:
        st = json.loads(text)
    except ValueError:
        return "device: `kiln-agent status --json` did not answer in JSON: " + (text.strip()[:300] or "(nothing)")
    if not isinstance(st, dict):
        return "device: `kiln-agent status --json` did not answer with an object"
    lines = [f"device: {st.get('class')} {st.get('version')} (compatible {st.get('compatible')}), "
             f"slot {st.get('bootedSlot')} ({st.get('bootControl')})"]
    root = st.get("root") or {}
    if root:
        lines.append(f"device: root {root.get('fstype')}, {'read-only' if root.get('readOnly') else 'read-write'}")
    if "secureBoot" in st:
        lines.append(f"device: secure boot {st.get('secureBoot') or 'unknown'}; root "
                     + (f"bound by the signed UKI to {st['rootDigest']}" if st.get("rootDigest") else
                        "not bound to a signed UKI"))
    health = st.get("health") or {}
    if health:
        lines.append(f"golden inference check: {health.get('status')} (exit {health.get('exitCode')}, "
                     f"{len(health.get('models') or [])} model(s))")
    if st.get("degraded"):
        lines.append(f"device: degraded: {st['degraded']}")
    return "\n".join(lines)
