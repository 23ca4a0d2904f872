"""The pieces of the release's SBOM and `kiln verify` that need no image: the dpkg database as dpkg reads it, the
hash-locked requirements, image references, and bad usage. The container tier releases a real image, verifies it
and tampers with it (tests/container/test_build.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from builder.cli import main
from builder.core.errors import UsageError
from builder.release.attest import artifact_tag, parse_dpkg_status, parse_requirements, split_ref
from tests.conftest import require_tool

pytestmark = pytest.mark.integration


def test_the_dpkg_database_reads_as_dpkg_reads_it() -> None:
    require_tool("dpkg-query")
    packages = parse_dpkg_status(Path("/var/lib/dpkg/status").read_bytes())
    out = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Abbrev} ${Package} ${Version}\n"],
                         capture_output=True, text=True, check=True).stdout
    installed = sorted((line.split()[1].split(":")[0], line.split()[2]) for line in out.splitlines()
                       if line.startswith("ii"))
    assert sorted((p["name"], p["version"]) for p in packages) == installed
    assert len(installed) > 100


def test_locked_requirements_and_references() -> None:
    wheels = parse_requirements("# locked\nnumpy==2.2.6 --hash=sha256:" + "ab" * 32 + "\n\nonnx==1.17.0\n")
    assert wheels == [{"name": "numpy", "version": "2.2.6", "sha256": "ab" * 32},
                      {"name": "onnx", "version": "1.17.0", "sha256": ""}]
    digest = "sha256:" + "c" * 64
    assert artifact_tag(digest, "sbom") == "sha256-" + "c" * 64 + ".sbom"
    assert split_ref(f"127.0.0.1:5000/kiln/qemu-x86_64@{digest}") == ("127.0.0.1:5000/kiln/qemu-x86_64", digest, "")
    assert split_ref("127.0.0.1:5000/kiln/qemu-x86_64:1.0.0") == ("127.0.0.1:5000/kiln/qemu-x86_64", "", "1.0.0")
    with pytest.raises(UsageError, match="REGISTRY/kiln/CLASS"):
        split_ref("127.0.0.1:5000/kiln/qemu-x86_64")


def test_kiln_verify_says_what_it_needs(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(main, ["verify", "127.0.0.1:1/kiln/x:1.0.0"])
    assert r.exit_code == 2 and "--key DIR or --public-key FILE" in r.output
    r = runner.invoke(main, ["verify", "127.0.0.1:1/kiln/x:1.0.0", "--key", str(tmp_path)])
    assert r.exit_code == 2 and "no release public key" in r.output
    r = runner.invoke(main, ["report", "qemu-x86_64", "intel-lowpower-detector", "--version", "1.0.0"])
    assert r.exit_code == 2 and "-o FILE" in r.output
