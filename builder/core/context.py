"""What one `kiln` run works with, made once by the CLI (or a test, or a bench) and passed down.

    ctx = make_context("podman")                       # state dir, engine, step timer
    record = build_class(ctx, hc, source=..., version="1.0.0")
    push_signed(ctx, hc.name, "1.0.0", registry, key=key)

Library functions take a Context; none of them picks its own state directory,
engine or timer, so a test with its own state dir cannot touch the CLI's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.core.engine import Engine, select_engine
from builder.core.progress import Steps
from builder.core.state import StateDir, make_state_dir


@dataclass(frozen=True, kw_only=True)
class Context:
    state: StateDir
    engine: Engine
    steps: Steps


def make_context(engine: str | Engine = "auto", *, state: StateDir | None = None, steps: Steps | None = None,
                 project_root: Path | None = None) -> Context:
    """The one place the defaults live: `<project>/.kiln` (or $KILN_STATE_DIR), `auto` engine, a loud timer.

    The engine's version is not checked here (`kiln build` checks it as a timed step; push does first)."""
    state = state or make_state_dir(project_root)
    eng = engine if isinstance(engine, Engine) else select_engine(engine, state, check=False)
    return Context(state=state, engine=eng, steps=steps or Steps())
