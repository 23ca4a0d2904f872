"""What the accel tier's modules share: the session's release key and the two production builds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from builder.core.run import run
from builder.disk.rawdisk import partition_offset
from builder.image.build import build_class
from builder.keys.release_key import make_signing_key
from builder.spec.loader import load_class
from tests.conftest import ROOT, require_tool
from tests.images import kiln_test_context

VERSION = "0.9.0-accel"
GPU, INTEL = "factory-gateway-gpu", "intel-lowpower-detector"
BOOT_TIMEOUT = float(os.environ.get("KILN_ACCEL_BOOT_TIMEOUT", "1800"))  # 4 GB of CUDA libraries under TCG
HEALTHY = r"kiln-health-inference: (healthy|degraded) \(exit 0"
UNHEALTHY = r"kiln-health-inference: [a-z-]+ \(exit [1-9]"
VAR = "/overlay/var/upper"  # /var on the data partition (the initramfs's overlay)


@pytest.fixture(scope="session")
def release_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_tool("gpg")
    directory = tmp_path_factory.mktemp("release-key")
    make_signing_key(directory)
    return directory


def build(name: str, key: Path, *, project: Path = ROOT, version: str = VERSION) -> dict[str, Any]:
    for tool in ("podman", "runc", "mmdebstrap"):
        require_tool(tool)
    hc = load_class(name, project / "images")
    return build_class(kiln_test_context(), hc, source=f"images/{name}.yaml", version=version, sign_key=key)


@pytest.fixture(scope="session")
def gpu_build(release_key: Path) -> dict[str, Any]:
    return build(GPU, release_key)


@pytest.fixture(scope="session")
def intel_build(release_key: Path) -> dict[str, Any]:
    return build(INTEL, release_key)


def read_var(image: Path, rel: str) -> Any:
    """A JSON file under /var of the powered-off disk (its data partition), or None."""
    offset = partition_offset(image, "data")
    out = run(["debugfs", "-R", f"cat {VAR}/{rel}", f"{image}?offset={offset}"], capture=True, check=False)
    text = out.stdout.decode(errors="replace")
    return json.loads(text) if text.strip().startswith("{") else None
