"""Step timing that stays readable in CI logs: `==> step` ... `<== step (1.2 s)`.

One timer per run (it lives in the Context). A step inside a step is printed
indented and not recorded: durations add up to the time spent. `mark()` and
`summary(since=...)` give one piece of work (one build of several) its own steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Steps:
    """Times named steps; `summary()` is what a build record stores."""

    log: list[tuple[str, float]] = field(default_factory=list)
    quiet: bool = False
    depth: int = 0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        indent = "  " * self.depth
        self.say(f"{indent}==> {name}")
        start = time.monotonic()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            elapsed = time.monotonic() - start
            if not self.depth:
                self.log.append((name, round(elapsed, 3)))
            self.say(f"{indent}<== {name} ({elapsed:.1f} s)")

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def mark(self) -> int:
        return len(self.log)

    def summary(self, since: int = 0) -> dict[str, float]:
        """Top-level step -> seconds, for the steps taken since `mark()` returned `since`."""
        return dict(self.log[since:])

    @property
    def durations(self) -> dict[str, float]:
        return self.summary()
