"""What the benchmarks share: their arguments, the machine they ran on, tables, figures as JSON,
and the bytes a registry has sent."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any

from builder.core.errors import KilnError
from builder.core.run import run
from builder.release.registry import RegistryInfo

ROOT = Path(__file__).resolve().parent.parent  # the checkout: its images/, models/ and state dir

# distribution's "response completed" line (its access log repeats each request: not counted)
WRITTEN = re.compile(r"http\.request\.method=GET .*http\.response\.written=(\d+)")


def make_parser(module: str, description: str) -> argparse.ArgumentParser:
    """`python -m MODULE` with --json, the one option every benchmark has."""
    ap = argparse.ArgumentParser(prog=f"python -m {module}", description=description)
    ap.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return ap


def describe_machine(**extra: Any) -> dict[str, Any]:
    """Where the figures come from: CPUs, architecture, kernel, Python (and what the caller adds)."""
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "kernel": platform.release(),
            "python": platform.python_version(), **extra}


def write_figures(path: Path | None, figures: dict[str, Any]) -> None:
    """The figures as JSON (keys sorted) at PATH, when --json asked for them."""
    if path is not None:
        path.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


def failed(exc: KilnError) -> int:
    """Report a Kiln error as the CLI would; its exit code."""
    print(f"error: {exc}", file=sys.stderr)
    return exc.exit_code


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,.0f} B"


def print_rows(rows: list[tuple[str, str, str]]) -> None:
    """A benchmark's table: figure, value (right-aligned), note."""
    width = max(len(r[0]) for r in rows)
    print(f"{'figure'.ljust(width)}  {'value':>12}  note")
    for name, value, note in rows:
        print(f"{name.ljust(width)}  {value:>12}  {note}")


def registry_bytes(info: RegistryInfo) -> int:
    """Bytes the registry has sent for GET requests so far (from its log)."""
    log = info.root / "registry.log"
    total = 0
    for line in log.read_text(errors="replace").splitlines():
        found = WRITTEN.search(line)
        if found:
            total += int(found.group(1))
    return total


def manifest(info: RegistryInfo, repo: str, ref: str) -> dict[str, Any]:
    proc = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{info.address}/{repo}:{ref}"],
               capture=True, quiet=True)
    return dict(json.loads(proc.stdout))
