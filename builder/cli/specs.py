"""`kiln list|show|validate|render|schema|lint`: the specs and what Kiln derives from them (the dry run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import yaml
from rich.table import Table

from builder.cli.common import cli_context, console, err_console, load, source_of
from builder.core import paths
from builder.core.errors import SpecError
from builder.image import render
from builder.spec import loader, names


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--no-probe", is_flag=True, help="Do not probe mirrors and vendor repositories.")
def list_classes(as_json: bool, no_probe: bool) -> None:
    """List hardware classes and whether this machine can build them."""
    from builder.base.capability import finalize_notes, why_not_buildable
    from builder.spec.contents import finalize_contents, finalize_summary

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
            "base": names.base_ref(hc),
            "whyNotBuildable": why_not_buildable(hc, probe_network=not no_probe),
            "notes": finalize_notes(hc, probe_network=not no_probe),
            "contents": finalize_contents(hc),
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
        for note in r.get("notes", []):
            console.print(f"{r['class']}: note: {note}", markup=False, soft_wrap=True)
    for name in [r["class"] for r in rows if "error" not in r]:
        summary = finalize_summary(load(name))
        if summary:
            console.print(f"{name}: contains {summary}", markup=False, soft_wrap=True)


@click.command()
@click.argument("cls", metavar="CLASS")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def show(cls: str, as_json: bool) -> None:
    """Show the resolved spec of CLASS (defaults merged) and what it derives."""
    from builder.spec.contents import finalize_contents

    hc = load(cls)
    plan = render.finalize_plan(hc, source=source_of(cls))
    data = {
        **hc.model_dump(mode="json", by_alias=True),
        "derived": {"baseRef": plan.base_ref, "osPackages": list(plan.os_packages),
                    "driverPackages": list(plan.driver_packages),
                    "driverBuildPackages": list(plan.driver_build_packages),
                    "contents": finalize_contents(hc),
                    "models": [{"name": m.name, "sha256": m.sha256, "precision": m.precision}
                               for m in plan.models]},
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        click.echo(yaml.safe_dump(data, sort_keys=False).rstrip())


@click.command()
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


@click.command("render")
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
    from builder.core.versions import release_version
    from builder.model.for_class import finalize_model_artifacts

    release_version(version, where="--version")

    hc = load(cls)
    artifacts = finalize_model_artifacts(hc)
    for a in artifacts:
        if not a.extra_files:
            err_console.print(f"warning: model {a.name} {a.version} is not optimized: baking the source "
                              f"FP32 model without a golden set (the golden health check will fail); "
                              f"run `kiln model optimize {hc.name}`", markup=False, soft_wrap=True)
    plan = render.finalize_plan(hc, source=source_of(cls), version=version, revision=revision,
                                models=artifacts)
    from builder.base.pins import check_driver_pins, make_checked_wheelhouse, spec_lines

    if not no_wheels:  # what a build would refuse first: the driver's pin on the base's mirror
        check_driver_pins(hc, source_of(cls), spec_lines(source_of(cls)))
    wheelhouse = None if no_wheels else make_checked_wheelhouse(hc, cli_context().state, source_of(cls))
    out = render.make_context(plan, output or paths.render_dir(hc.name), wheelhouse)
    click.echo(f"rendered {hc.name} {version} -> {out}/Containerfile")


@click.command()
@click.option("--format", "fmt", type=click.Choice(["json", "markdown", "device-contract"]), default="json",
              show_default=True, help="json: the class schema; markdown: the spec reference; device-contract: "
                                      "the reference of what the builder and the device agree on.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Write to a file.")
def schema(fmt: str, output: Path | None) -> None:
    """Print the JSON Schema of a hardware class (or the Markdown spec reference, or the device contract's)."""
    from builder.spec import docs

    text = {"json": docs.schema_json, "markdown": docs.spec_reference,
            "device-contract": docs.device_contract}[fmt]()
    if output:
        output.write_text(text)
        click.echo(f"wrote {output}")
    else:
        click.echo(text, nl=False)


@click.command("lint")
@click.argument("rootfs", type=click.Path(path_type=Path, exists=True, file_okay=False))
def lint_cmd(rootfs: Path) -> None:
    """Run the image lints over an unpacked ROOTFS directory."""
    from builder.image.lint import lint_rootfs, load_lint_module

    findings = lint_rootfs(rootfs)
    for f in findings:
        click.echo(f"warning: {f.lint}: {f.message}")  # type: ignore[attr-defined]
    click.echo(f"{len(load_lint_module().LINTS)} lints passed on {rootfs}")
