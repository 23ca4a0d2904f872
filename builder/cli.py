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
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False,
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
def render_cmd(cls: str, output: Path | None, version: str, revision: str) -> None:
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
    out = render.make_context(plan, output or paths.build_dir() / hc.name / "context")
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


@main.command()
@click.option("--class", "cls", default="qemu-x86_64", show_default=True, help="The class to run.")
def demo(cls: str) -> None:
    """The main job: validate, optimize + gate the model, render and lint CLASS."""
    from builder import models
    from builder.progress import Steps
    from builder.run import run as run_cmd

    steps = Steps()
    with steps.step("validate every class"):
        for name in loader.known_classes():
            load(name)
            click.echo(f"ok  {name}")
    hc = load(cls)
    with steps.step(f"optimize and gate the models of {cls}"):
        from builder import model as mdl

        for report in models.make_optimized_models(hc):
            console.print(mdl.render_table(report))
    with steps.step(f"render {cls}"):
        artifacts = models.finalize_model_artifacts(hc, require_optimized=True)
        plan = render.finalize_plan(hc, source=source_of(cls), models=artifacts)
        out = render.make_context(plan, paths.build_dir() / hc.name / "context")
        click.echo(f"build context: {out}")
    with steps.step("lint the Containerfile (hadolint)"):
        config = paths.project_root() / ".hadolint.yaml"
        run_cmd(["hadolint", "--config", config, out / "Containerfile"])
    click.echo(f"demo: {cls} validated, model gated "
               f"({', '.join(f'{a.name}={a.precision}' for a in artifacts)}), rendered and linted; "
               f"durations {steps.summary()}")


if __name__ == "__main__":
    main()
