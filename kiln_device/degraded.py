"""Degraded modes: what a device does when its accelerator is missing or fails.

A class declares it (spec.accelerator.fallback, carried in release.json `fallback`):

- `degrade`: serve on the CPU provider. The device comes up healthy but *degraded*: the inference
  service keeps serving, the golden check holds it to the degraded envelope (fallback.p95LatencyMs),
  gpu-visible passes, and each records `degraded` with the reason. A trial boot is blessed.
- `fail`: the health checks fail with the reason, so a trial boot is rolled back.

Every writer (kiln-inference, kiln-health-inference, kiln-health-gpu) puts the same three keys
in its state file: `degraded` (bool), `degraded_reason` and `boot_id`; `kiln-agent status` reads
them all (contract.DEGRADED_SOURCES) and reports the ones written during this boot.

Standard library only: the agent (system python3) imports it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln_device.contract import BOOT_ID, CPU_PROVIDER, DEGRADED_SOURCES, FALLBACK_POLICIES, Release, under

DEGRADE, FAIL = FALLBACK_POLICIES
POLICIES = FALLBACK_POLICIES
CPU = CPU_PROVIDER


@dataclass(frozen=True)
class Fallback:
    policy: str  # degrade | fail
    p95_latency_ms: float | None  # the degraded envelope (degrade); None: the class envelope applies

    @property
    def degrades(self) -> bool:
        return self.policy == DEGRADE


def parse_fallback(release: Release) -> Fallback:
    """release.json's `fallback`. A release.json without one (made before degraded modes) keeps the old
    behaviour: degrade when the class lists the CPU provider, else fail."""
    if release.fallback is None:
        return Fallback(DEGRADE if CPU in release.execution_providers else FAIL, None)
    return Fallback(release.fallback.policy, release.fallback.p95_latency_ms)


def read_boot_id(root: Path = Path("/")) -> str | None:
    try:
        return under(root, BOOT_ID).read_text().strip() or None
    except OSError:
        return None


def state(degraded: bool, reason: str | None, root: Path = Path("/")) -> dict[str, Any]:
    """The keys every degraded-mode writer records."""
    return {"degraded": degraded, "degraded_reason": reason if degraded else None, "boot_id": read_boot_id(root)}


@dataclass(frozen=True)
class Degraded:
    source: str  # the state file's device path
    reason: str


def read_degraded(root: Path = Path("/"), boot_id: str | None = None) -> list[Degraded]:
    """Every state file that says degraded during boot `boot_id` (all of them when either side
    does not know its boot id). Missing or unreadable files say nothing."""
    found = []
    for source in DEGRADED_SOURCES:
        try:
            data = json.loads(under(root, source).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or data.get("degraded") is not True:
            continue
        written = data.get("boot_id")
        if boot_id and written and written != boot_id:
            continue  # an earlier boot's
        found.append(Degraded(source, str(data.get("degraded_reason") or "no reason recorded")))
    return found


def summary(found: list[Degraded]) -> str | None:
    """One line for people: the distinct reasons, in source order (None: not degraded)."""
    reasons = list(dict.fromkeys(d.reason for d in found))
    return "; ".join(reasons) or None
