"""Step timing that stays readable in CI logs: `==> step` ... `<== step (1.2 s)`.

One timer per run (it lives in the Context). A step inside a step is printed
indented and not recorded: durations add up to the time spent. `mark()` and
`summary(since=...)` give one piece of work (one build of several) its own steps.

Long steps (the base bootstrap, the wheel download, a build, a push, signing) say that they are
still going:
- off a terminal (CI, a pipe, a log file), every line carries a UTC timestamp, and a step that runs
  longer than KILN_PROGRESS_SECONDS (30) prints `... step: 60 s` at that interval;
- on a terminal, the running step shows as a live line (a spinner, its name and the time it has
  taken) under the output, which scrolls above it.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from builder.core import output

INTERVAL_ENV = "KILN_PROGRESS_SECONDS"


def stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def interval() -> float:
    try:
        return max(1.0, float(os.environ.get(INTERVAL_ENV, "30")))
    except ValueError:
        return 30.0


@dataclass
class Steps:
    """Times named steps; `summary()` is what a build record stores."""

    log: list[tuple[str, float]] = field(default_factory=list)
    quiet: bool = False
    depth: int = 0
    terminal: bool | None = None  # None: whether stderr is a terminal (and CI is not set)

    def __post_init__(self) -> None:
        if self.terminal is None:
            self.terminal = sys.stderr.isatty() and os.environ.get("CI", "").lower() != "true"

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        indent = "  " * self.depth
        self.say(f"{indent}==> {name}")
        start = time.monotonic()
        self.depth += 1
        progress = self._progress(name, start) if self.depth == 1 and not self.quiet else _nothing()
        try:
            with progress:
                yield
        finally:
            self.depth -= 1
            elapsed = time.monotonic() - start
            if not self.depth:
                self.log.append((name, round(elapsed, 3)))
            self.say(f"{indent}<== {name} ({elapsed:.1f} s)")

    def say(self, message: str) -> None:
        if not self.quiet:
            line = message if self.terminal else f"{stamp()} {message}"
            sys.stderr.write(line + "\n")  # one write: never split by a tool's output (the heartbeat's thread)
            sys.stderr.flush()
            output.note(f"{stamp()} {message}")

    @contextmanager
    def _progress(self, name: str, start: float) -> Iterator[None]:
        if self.terminal:
            with _live(name, start):
                yield
            return
        stop = threading.Event()

        def beat() -> None:
            every = interval()
            while not stop.wait(every):
                sys.stderr.write(f"{stamp()} ... {name}: {time.monotonic() - start:.0f} s\n")
                sys.stderr.flush()

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def mark(self) -> int:
        return len(self.log)

    def summary(self, since: int = 0) -> dict[str, float]:
        """Top-level step -> seconds, for the steps taken since `mark()` returned `since`."""
        return dict(self.log[since:])

    @property
    def durations(self) -> dict[str, float]:
        return self.summary()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def _live(name: str, start: float) -> Iterator[None]:
    """A transient status line on the terminal: what Python prints to stderr scrolls above it."""
    from rich.console import Console
    from rich.live import Live
    from rich.spinner import Spinner
    from rich.text import Text

    class Elapsed:
        def __rich__(self) -> Any:
            return Spinner("dots", Text(f"{name} ({time.monotonic() - start:.0f} s)"))

    console = Console(file=sys.stderr)
    with Live(Elapsed(), console=console, refresh_per_second=4, transient=True, redirect_stderr=True,
              redirect_stdout=False):
        yield
