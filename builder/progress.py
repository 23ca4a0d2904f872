"""Step timing that stays readable in CI logs: `==> step` ... `<== step (1.2 s)`."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Steps:
    """Times named steps; `summary()` is what a build record stores."""

    durations: dict[str, float] = field(default_factory=dict)
    quiet: bool = False

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.say(f"==> {name}")
        start = time.monotonic()
        try:
            yield
        finally:
            elapsed = time.monotonic() - start
            self.durations[name] = round(elapsed, 3)
            self.say(f"<== {name} ({elapsed:.1f} s)")

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def summary(self) -> dict[str, float]:
        return dict(self.durations)
