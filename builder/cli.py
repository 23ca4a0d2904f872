"""The `kiln` command line. The only place that turns errors into exit codes."""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from builder import __version__, loader, paths, render
from builder.errors import KilnError, SpecError, UsageError

# Logs (CI, pipes) are not terminals: give tables room instead of rich's 80 columns.
console = Console(stderr=False, highlight=False, width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


class KilnGroup(click.Group):
    """Catches KilnError once, prints it without a traceback, exits with its code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False,
                              soft_wrap=True)
            if exc.hint:
                err_console.print(f"hint: {exc.hint}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug in Kiln: say so plainly, trace only with --debug
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            err_console.print(f"internal error: {type(exc).__name__}: {exc} "
                              "(run with --debug for a traceback)", markup=False, soft_wrap=True)
            ctx.exit(1)


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option("--debug", is_flag=True, help="Show external commands and tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Kiln builds immutable edge-AI OS images, one per hardware class."""
    ctx.obj = {"debug": debug}


def load(ref: str) -> loader.HardwareClass:
    return loader.load_class(ref)


def source_of(ref: str) -> str:
    path = loader.resolve_class_path(ref)
    try:
        return str(path.resolve().relative_to(paths.project_root()))
    except ValueError:
        return str(path)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--no-probe", is_flag=True, help="Do not probe mirrors and vendor repositories.")
def list_classes(as_json: bool, no_probe: bool) -> None:
    """List hardware classes and whether this machine can build them."""
    from builder.capability import why_not_buildable

    rows: list[dict[str, Any]] = []
    for name in loader.known_classes():
        try:
            hc = load(name)
        except SpecError as exc:
            rows.append({"class": name, "error": exc.problems})
            continue
        s = hc.spec
        rows.append({
            "class": name, "architecture": s.architecture.value,
            "accelerator": s.accelerator.kind.value,
            "runtime": f"{s.runtime.name.value} {s.runtime.version}",
            "base": render.finalize_base_ref(hc),
            "whyNotBuildable": why_not_buildable(hc, probe_network=not no_probe),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table("class", "arch", "accelerator", "runtime", "buildable here")
    for r in rows:
        if "error" in r:
            table.add_row(r["class"], "", "", "", f"[red]invalid spec ({len(r['error'])} errors)[/]")
            continue
        table.add_row(r["class"], r["architecture"], r["accelerator"], r["runtime"],
                      "no (see below)" if r["whyNotBuildable"] else "yes")
    console.print(table)
    for r in rows:
        for why in r.get("whyNotBuildable", []):
            console.print(f"{r['class']}: {why}", markup=False, soft_wrap=True)


@main.command()
@click.argument("cls", metavar="CLASS")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(cls: str, as_json: bool) -> None:
    """Show the resolved spec of CLASS (defaults merged) and what it derives."""
    hc = load(cls)
    plan = render.finalize_plan(hc, source=source_of(cls))
    data = {
        **hc.model_dump(mode="json", by_alias=True),
        "derived": {"baseRef": plan.base_ref, "osPackages": list(plan.os_packages),
                    "driverPackages": list(plan.driver_packages),
                    "models": [{"name": m.name, "sha256": m.sha256, "precision": m.precision}
                               for m in plan.models]},
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@main.command()
@click.argument("specs", nargs=-1, metavar="[PATH|CLASS]...")
def validate(specs: tuple[str, ...]) -> None:
    """Validate specs (default: every class in images/); report every error."""
    refs = list(specs) or loader.known_classes()
    failed: list[SpecError] = []
    for ref in refs:
        try:
            load(ref)
            click.echo(f"ok  {ref}")
        except SpecError as exc:
            click.echo(f"bad {ref}")
            failed.append(exc)
    for problem in failed:
        err_console.print(str(problem), markup=False, highlight=False, soft_wrap=True)
    if failed:
        sys.exit(SpecError.exit_code)


@main.command("render")
@click.argument("cls", metavar="CLASS")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Context directory "
              "(default build/<class>/context).")
@click.option("--version", "version", default=render.DEFAULT_VERSION, show_default=True,
              help="Release version baked into release.json and labels.")
@click.option("--revision", default="unknown", help="Source revision (e.g. a git commit).")
@click.option("--no-wheels", is_flag=True, help="Do not download the runtime's wheels (the context "
              "then cannot be built offline).")
def render_cmd(cls: str, output: Path | None, version: str, revision: str, no_wheels: bool) -> None:
    """Render CLASS into a build context: Containerfile, overlays, model, release.json."""
    from builder.safe import version as check_version

    try:
        check_version(version)
    except ValueError as exc:
        raise UsageError(f"--version: {exc}") from None
    from builder.models import finalize_model_artifacts

    hc = load(cls)
    artifacts = finalize_model_artifacts(hc)
    for a in artifacts:
        if not a.extra_files:
            err_console.print(f"warning: model {a.name} {a.version} is not optimized: baking the source "
                              f"FP32 model without a golden set (the golden health check will fail); "
                              f"run `kiln model optimize {hc.name}`", markup=False, soft_wrap=True)
    plan = render.finalize_plan(hc, source=source_of(cls), version=version, revision=revision,
                                models=artifacts)
    from builder.state import make_state_dir
    from builder.wheels import make_wheelhouse

    wheelhouse = None if no_wheels else make_wheelhouse(hc, make_state_dir())
    out = render.make_context(plan, output or paths.build_dir() / hc.name / "context", wheelhouse)
    click.echo(f"rendered {hc.name} {version} -> {out}/Containerfile")


@main.command()
@click.option("--format", "fmt", type=click.Choice(["json", "markdown"]), default="json",
              show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to a file.")
def schema(fmt: str, output: Path | None) -> None:
    """Print the JSON Schema of a hardware class (or the Markdown spec reference)."""
    from builder import docs

    text = docs.schema_json() if fmt == "json" else docs.spec_reference()
    if output:
        output.write_text(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@main.command("lint")
@click.argument("rootfs", type=click.Path(path_type=Path, exists=True, file_okay=False))
def lint_cmd(rootfs: Path) -> None:
    """Run the image lints over an unpacked ROOTFS directory."""
    from builder.lint import lint_rootfs, load_lint_module

    findings = lint_rootfs(rootfs)
    for f in findings:
        click.echo(f"warning: {f.lint}: {f.message}")  # type: ignore[attr-defined]
    click.echo(f"{len(load_lint_module().LINTS)} lints passed on {rootfs}")


@main.group()
def model() -> None:
    """Optimize and validate models against their release gates."""


@model.command("optimize")
@click.argument("cls", metavar="[CLASS]", required=False)
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Ad-hoc: an ONNX model (instead of CLASS).")
@click.option("--calibration", type=click.Path(path_type=Path, dir_okay=False),
              help="Ad-hoc: calibration inputs (.npz with x).")
@click.option("--validation", type=click.Path(path_type=Path, dir_okay=False),
              help="Ad-hoc: validation inputs and labels (.npz with x, y).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "int8"]), default="auto",
              show_default=True, help="Ad-hoc: pin a precision.")
@click.option("--candidates", default="int8-static", show_default=True,
              help="Ad-hoc: comma-separated candidates (int8-static, int8-dynamic, fp16).")
@click.option("--max-accuracy-drop", type=float, default=0.01, show_default=True, help="Ad-hoc gate.")
@click.option("-o", "--output", type=click.Path(path_type=Path, file_okay=False),
              help="Output directory (default build/<class>/models/<name>/<version>/).")
@click.option("--json", "as_json", is_flag=True, help="Print the report(s) as JSON.")
def model_optimize(cls: str | None, model_path: Path | None, calibration: Path | None,
                   validation: Path | None, precision: str, candidates: str, max_accuracy_drop: float,
                   output: Path | None, as_json: bool) -> None:
    """Optimize CLASS's models (or one ad-hoc --model), validate on real inputs, apply gates.

    Exit code 5 when no candidate passes the gates (report.json says why).
    """
    from builder import model as mdl
    from builder import models

    say = err_console.print
    if cls and model_path:
        raise UsageError("give CLASS or --model, not both")
    if cls:
        reports = models.make_optimized_models(load(cls), progress=lambda m: say(m, markup=False))
    else:
        if not (model_path and calibration and validation):
            raise UsageError("ad-hoc use needs --model, --calibration and --validation (or give a CLASS)")
        policy = mdl.OptimizationPolicy(precision=precision,
                                        candidates=tuple(c for c in candidates.split(",") if c))
        gates = mdl.Gates(max_accuracy_drop=max_accuracy_drop)
        out = output or paths.build_dir() / "adhoc" / model_path.stem
        reports = [mdl.optimize_model(model_path, calibration, validation, policy, gates, out,
                                      lambda m: say(m, markup=False))]
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in reports], indent=2))
        return
    for report in reports:
        console.print(mdl.render_table(report))
        for reason in report.reasons:
            console.print(f"  {reason}", markup=False)


ENGINE_OPTION = click.option("--engine", type=click.Choice(["auto", "podman", "docker"]), default="auto",
                             show_default=True, help="OCI engine: podman CLI, or the docker SDK "
                             "(auto: docker when DOCKER_HOST is set).")


@main.command("base")
@click.option("--release", default="bookworm", show_default=True, help="Debian release.")
@click.option("--arch", default="x86_64", show_default=True, help="Architecture (x86_64, aarch64).")
@click.option("--mirror", help="Debian mirror (default deb.debian.org).")
@click.option("--snapshot", help="snapshot.debian.org timestamp (YYYYMMDDTHHMMSSZ) for a pinned base.")
@click.option("--force", is_flag=True, help="Rebuild even when the cached base is current.")
@ENGINE_OPTION
def base_cmd(release: str, arch: str, mirror: str | None, snapshot: str | None, force: bool,
             engine: str) -> None:
    """Bootstrap the offline Debian base (mmdebstrap) into Kiln's container store; cached."""
    from builder.base import make_base
    from builder.engine import select_engine
    from builder.safe import snapshot as check_snapshot
    from builder.state import make_state_dir

    if snapshot:
        try:
            check_snapshot(snapshot)
        except ValueError as exc:
            raise UsageError(f"--snapshot: {exc}") from None
    state = make_state_dir()
    image = make_base(release, arch, state=state, engine=select_engine(engine, state, check=False),
                      mirror=mirror, snapshot=snapshot, force=force)
    click.echo(f"{image.ref} {image.image_id} (kernel {image.kernel}; "
               f"{'built' if image.built else 'cached'}; tarball {image.tarball})")


@main.command("build")
@click.argument("cls", metavar="CLASS")
@click.option("--version", "version", default=render.DEFAULT_VERSION, show_default=True,
              help="Release version (image tag, release.json, labels).")
@click.option("--revision", help="Source revision (default: the git commit of the project).")
@ENGINE_OPTION
@click.option("--push", "push_to", metavar="REGISTRY", help="Push after building (host:port[/path]).")
@click.option("--tls-verify/--no-tls-verify", default=None,
              help="Verify the registry's TLS certificate (default: on, off for 127.0.0.1/localhost).")
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
    from builder import build
    from builder.progress import Steps

    hc = load(cls)
    steps = Steps()
    record = build.build_class(hc, source=source_of(cls), version=version, revision=revision,
                               engine=engine, no_cache=no_cache, sign_key=sign_key, steps=steps)
    if push_to:
        from builder.signing import push_signed, read_signing_key

        key = read_signing_key(Path(record["releaseKey"]["directory"]))
        record = push_signed(hc.name, version, push_to, key=key, engine=engine, tls_verify=tls_verify, steps=steps)
    click.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else build.describe(record))


@main.command("push")
@click.argument("cls", metavar="CLASS")
@click.argument("registry")
@click.option("--version", "version", default=render.DEFAULT_VERSION, show_default=True,
              help="The built version to push.")
@ENGINE_OPTION
@click.option("--tls-verify/--no-tls-verify", default=None,
              help="Verify the registry's TLS certificate (default: on, off for 127.0.0.1/localhost).")
@click.option("--creds", metavar="USER:PASSWORD", envvar="KILN_REGISTRY_CREDS",
              help="Registry credentials (or KILN_REGISTRY_CREDS).")
@click.option("--cert-dir", type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Directory with the ca.crt of a registry with its own CA (podman).")
@click.option("--sign-by", type=click.Path(path_type=Path, file_okay=False),
              help="Sign with this release key (kiln keys init) and publish the signature in the lookaside dir.")
@click.option("--json", "as_json", is_flag=True, help="Print the build record as JSON.")
def push_cmd(cls: str, registry: str, version: str, engine: str, tls_verify: bool | None,
             creds: str | None, cert_dir: Path | None, sign_by: Path | None, as_json: bool) -> None:
    """Push a built CLASS VERSION to REGISTRY/kiln/CLASS:VERSION; records the pushed digest.

    With --sign-by, the image goes to a staging tag first and :VERSION moves only
    after its signature is stored (see `kiln release`)."""
    from builder import build

    if sign_by is not None:
        from builder.signing import push_signed, read_signing_key

        record = push_signed(cls, version, registry, key=read_signing_key(sign_by), engine=engine,
                             tls_verify=tls_verify, creds=creds, cert_dir=cert_dir)
    else:
        record = build.push_build(cls, version, registry, engine=engine, tls_verify=tls_verify, creds=creds,
                                  cert_dir=cert_dir)
    pushed = record["pushed"][-1]
    click.echo(json.dumps(record, indent=2, sort_keys=True) if as_json else
               f"pushed {pushed['byDigest']} (local image {record['image']['id'][:19]})")


@main.group("registry")
def registry_group() -> None:
    """A local OCI registry (Debian's docker-registry) on 127.0.0.1, state in .kiln/registry/."""


def _registry_root() -> Path:
    from builder.state import make_state_dir

    return make_state_dir().root / "registry"


@registry_group.command("start")
@click.option("--port", type=click.IntRange(1, 65535), default=5000, show_default=True)
@click.option("--tls", is_flag=True, help="Serve HTTPS with a self-signed certificate for 127.0.0.1.")
@click.option("--htpasswd", metavar="USER:PASSWORD", help="Require this user (htpasswd, bcrypt).")
@click.option("--lookaside-port", type=click.IntRange(0, 65535), default=5080, show_default=True,
              help="Also serve the signature directory (.kiln/signatures) over HTTP here; 0: do not.")
def registry_start(port: int, tls: bool, htpasswd: str | None, lookaside_port: int) -> None:
    """Start the registry (and the signature server devices read) in the background."""
    from builder.registry import start_registry
    from builder.signing import finalize_lookaside_dir
    from builder.state import make_state_dir

    sigs = finalize_lookaside_dir(make_state_dir()) if lookaside_port else None
    info = start_registry(_registry_root(), port=port, tls=tls, htpasswd=htpasswd, lookaside_dir=sigs,
                          lookaside_port=lookaside_port or None)
    click.echo(f"registry at {info.address} (pid {info.pid}, {info.url}); data in {info.root / 'data'}; "
               f"push with: kiln push CLASS {info.address}")
    if info.lookaside:
        click.echo(f"signatures from {sigs} at {info.lookaside} (pid {info.lookaside_pid})")


@registry_group.command("status")
def registry_status() -> None:
    """Say whether the registry runs and where."""
    from builder.registry import RegistryPaths, read_info

    info = read_info(RegistryPaths(_registry_root()))
    if info is None:
        click.echo("no Kiln registry is running")
        sys.exit(1)
    click.echo(f"registry at {info.address} (pid {info.pid}, {info.url})")


@registry_group.command("stop")
def registry_stop() -> None:
    """Stop the registry (its data stays in .kiln/registry/data)."""
    from builder.registry import stop_registry

    info = stop_registry(_registry_root())
    click.echo(f"stopped the registry at {info.address}" if info else "no Kiln registry was running")


@main.command()
@click.option("--class", "cls", default="qemu-x86_64", show_default=True, help="The class to run.")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Version to build and boot.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="QEMU accelerator (auto: KVM when it can boot OVMF here, else TCG).")
@click.option("--timeout", type=float, default=900, show_default=True,
              help="Seconds to wait for the booted device to pass its health check.")
def demo(cls: str, version: str, accel: str, timeout: float) -> None:
    """The main job: validate, build CLASS (model gated), make its A/B disk, boot it, show it healthy."""
    from builder import build, disk, vm
    from builder.progress import Steps

    steps = Steps()
    with steps.step("validate every class"):
        for name in loader.known_classes():
            load(name)
            click.echo(f"ok  {name}")
    hc = load(cls)
    record = build.build_class(hc, source=source_of(cls), version=version, steps=steps)
    click.echo(build.describe(record))
    made = disk.make_disk(record["image"]["ref"], version=version, steps=steps)
    click.echo(f"disk: {made.output}")
    key = vm.finalize_ssh_key(hc.name)
    config = vm.VMConfig(disk=Path(made.output), accel=vm.Accel(accel), snapshot=True,
                         ssh_key=key if key.is_file() else None)
    with steps.step(f"boot {cls} {version} in QEMU and wait for its health check"), vm.start_vm(config) as machine:
        healthy = machine.wait_for_healthy(timeout)
        click.echo(f"healthy {healthy:.1f} s after QEMU started ({machine.accel.value})")
        report = machine.guest_exec(
            "cat /usr/lib/kiln/release.json /var/lib/kiln/health/inference.json; echo; "
            "tr ' ' '\\n' < /proc/cmdline | grep '^kiln.slot='; findmnt -no FSTYPE,OPTIONS /",
            check=False).stdout
        click.echo(summarize_device(report))
        machine.poweroff()
    click.echo(f"demo: {cls} {version} built, gated, flashed and booted healthy; durations "
               + ", ".join(f"{k} {v:.1f} s" for k, v in steps.summary().items()))


def summarize_device(text: str) -> str:
    """A few lines from release.json, the health result, the slot and the root mount, as the VM reported them."""
    decoder = json.JSONDecoder()
    docs: list[Any] = []
    rest = text.strip()
    while rest.startswith("{"):
        try:
            doc, end = decoder.raw_decode(rest)
        except ValueError:
            break
        docs.append(doc)
        rest = rest[end:].strip()
    lines = []
    if docs:
        rel = docs[0]
        lines.append(f"device: {rel.get('class')} {rel.get('version')} (compatible {rel.get('compatible')})")
    if len(docs) > 1:
        health = docs[1]
        lines.append(f"golden inference check: {health.get('status')} "
                     f"(exit {health.get('exit_code')}, {len(health.get('models', []))} model(s))")
    lines += [f"device: {line.strip()}" for line in rest.splitlines() if line.strip()]
    return "\n".join(lines)

from builder import cli_device  # noqa: E402,F401  (registers disk and vm commands)

from builder import cli_release  # noqa: E402,F401  # isort: skip

if __name__ == "__main__":
    from builder.cli import main as _main  # the module cli_device and cli_release registered on

    _main()
