"""Linters as tests: ruff, mypy, shellcheck on shipped scripts, actionlint, systemd units."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]


def shell_scripts() -> list[Path]:
    out = []
    for path in sorted([*ROOT.glob("overlays/**/*"), *ROOT.glob("scripts/*"), ROOT / ".ci/run"]):
        if path.is_file() and path.read_bytes()[:2] == b"#!" and b"sh" in path.read_bytes().split(b"\n")[0]:
            out.append(path)
    return out


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_ruff() -> None:
    r = run([require_tool("ruff"), "check", "."])
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy() -> None:
    r = run([require_tool("mypy")])  # files = ["builder", "kiln_device"] in pyproject.toml
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_shellcheck(script: Path) -> None:
    r = run([require_tool("shellcheck"), str(script)])
    assert r.returncode == 0, r.stdout + r.stderr


def test_found_the_shell_scripts() -> None:
    names = {p.name for p in shell_scripts()}
    assert {"kiln-overlay", "setup.sh", "run"} <= names


def test_actionlint() -> None:
    workflows = sorted(str(p) for p in (ROOT / ".github/workflows").glob("*.yml"))
    assert workflows
    r = run([require_tool("actionlint"), *workflows])
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    units = sorted(ROOT.glob("overlays/*/usr/lib/systemd/system/*.service"))
    assert units
    # Verify against the unit's own tree; ExecStart binaries that only exist in images
    # (nvidia-ctk, ssh-keygen on a builder without ssh) are reported as missing, which we accept.
    for unit in units:
        r = run([analyze, "verify", "--man=no", str(unit)])
        problems = [ln for ln in (r.stdout + r.stderr).splitlines()
                    if ln.strip() and "is not executable" not in ln and "No such file" not in ln
                    and "Failed to prepare filename" not in ln and "Command " not in ln]
        assert not problems, f"{unit.name}:\n" + "\n".join(problems)


def test_the_release_workflow_runs_kiln_and_nothing_else() -> None:
    """release.yml holds no logic of its own: each step is the setup script or a kiln command, so the same
    release runs on a workstation; its secrets reach kiln through the environment only."""
    import yaml

    wf = yaml.safe_load((ROOT / ".github/workflows/release.yml").read_text())
    job = wf["jobs"]["release"]
    runs = [s["run"] for s in job["steps"] if "run" in s]
    assert runs and runs[0] == "sudo ./scripts/setup.sh"
    for command in runs[1:]:
        assert command.startswith("sudo -E .venv/bin/kiln "), command
        assert "secrets." not in command and "KILN_REGISTRY_CREDS" not in command, command
    assert {s["uses"].split("@")[0] for s in job["steps"] if "uses" in s} == {"actions/checkout",
                                                                              "actions/upload-artifact"}
    assert {"release", "verify", "keys"} <= {c.split()[3] for c in runs[1:]}
    secret = {name for step in job["steps"] for name, value in (step.get("env") or {}).items() if "secrets." in value}
    assert secret == {"KILN_RELEASE_KEY", "KILN_KEY_PASSPHRASE", "KILN_REGISTRY_CREDS"}
    assert not any("secrets." in str(v) for v in (job.get("env") or {}).values())  # only the steps that need one
    assert not job["steps"][1].get("env")  # the setup script (apt, pip) sees none
