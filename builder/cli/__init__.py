"""The `kiln` command line. The only place that turns errors into exit codes.

Each command group lives in a module of its own and is registered here, explicitly:

    specs     list, show, validate, render, schema, lint
    model     model optimize
    images    base, build, push, demo
    registry  registry start|status|stop
    device    disk, vm run
    release   keys init|show, policy, release
    channel   channel init|status|withdraw|refresh|rotate (TUF)
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import click
from rich.markup import escape

from builder import __version__
from builder.cli import channel, device, fleet, images, model, registry, release, specs
from builder.cli.common import err_console
from builder.core import output
from builder.core.errors import KilnError
from builder.core.redact import redact
from builder.core.state import finalize_state_root


class KilnGroup(click.Group):
    """Catches KilnError once, prints it without a traceback, exits with its code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KilnError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                sys.stderr.write(redact(traceback.format_exc()))
            err_console.print(f"[bold red]error:[/] {escape(redact(str(exc)))}", markup=True, highlight=False,
                              soft_wrap=True)
            if exc.hint:
                err_console.print(f"hint: {exc.hint}", soft_wrap=True)
            if output.shown_log_path():
                err_console.print(f"log: {output.shown_log_path()} (every command and its output)",
                                  markup=False, soft_wrap=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:  # a bug in Kiln: say so plainly, trace only with --debug
            if ctx.obj and ctx.obj.get("debug"):
                sys.stderr.write(redact(traceback.format_exc()))
            err_console.print(f"internal error: {type(exc).__name__}: {redact(str(exc))} "
                              "(run with --debug for a traceback)", markup=False, soft_wrap=True)
            if output.shown_log_path():
                err_console.print(f"log: {output.shown_log_path()}", markup=False, soft_wrap=True)
            ctx.exit(1)


@click.group(cls=KilnGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kiln")
@click.option("--debug", is_flag=True,
              help="Also show external commands and their output (always in the run's log file, "
                   "<state>/logs/), and tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Kiln builds immutable edge-AI OS images, one per hardware class."""
    ctx.obj = {"debug": debug}
    output.configure(show=debug, log_dir=lambda: finalize_state_root() / "logs")
    ctx.call_on_close(output.reset)


COMMANDS: tuple[click.Command, ...] = (
    specs.list_classes, specs.show, specs.validate, specs.render_cmd, specs.schema, specs.lint_cmd,
    model.model,
    images.base_cmd, images.build_cmd, images.push_cmd,
    registry.registry_group,
    device.disk_cmd, device.vm_group,
    release.keys_group, release.policy_cmd, release.release_cmd, release.verify_cmd, release.report_cmd,
    channel.channel_group,
    fleet.fleet_group, fleet.rollout_group,
    images.demo,
)
for _command in COMMANDS:
    main.add_command(_command)
