"""The names Kiln gives images: one function each, formats pinned."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder import names
from builder.loader import load_class

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("args", "ref"), [
    (("bookworm", "x86_64"), "localhost/kiln/base/debian:bookworm"),
    (("bookworm", "x86_64", "20250520T000000Z"), "localhost/kiln/base/debian:bookworm-20250520T000000Z"),
    (("bookworm", "aarch64"), "localhost/kiln/base/debian:bookworm-aarch64"),
    (("bookworm", "aarch64", "20250520T000000Z"), "localhost/kiln/base/debian:bookworm-20250520T000000Z-aarch64"),
])
def test_offline_base_ref_format(args: tuple[str, ...], ref: str) -> None:
    assert names.offline_base_ref(*args) == ref


@pytest.mark.parametrize(("name", "ref"), [
    ("qemu-x86_64", "localhost/kiln/base/debian:bookworm"),
    ("factory-gateway-gpu", "localhost/kiln/base/debian:bookworm-20261101T000000Z"),
    ("jetson-vision-standard", "localhost/kiln/base/ubuntu:jammy-20261101T000000Z-aarch64"),
    ("medical-cart-cpu", "quay.io/centos-bootc/centos-bootc:stream9@sha256:"
                         "3a75c664fbf8c540b0c75e9c0cac76828ee600bc58b4378c73a3d9a5eb2f0852"),
])
def test_a_class_builds_from_its_base_ref(name: str, ref: str) -> None:
    assert names.base_ref(load_class(name, ROOT / "images")) == ref
