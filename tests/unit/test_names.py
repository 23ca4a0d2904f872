"""The names Kiln gives images: one function each, formats pinned."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.spec import names
from builder.spec.loader import load_class

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
    ("qemu-x86_64", "localhost/kiln/base/debian:bookworm-modules-9ae267e7"),  # it drops kernel modules
    ("factory-gateway-gpu", "localhost/kiln/base/debian:bookworm-20261101T000000Z"),
    ("jetson-vision-standard", "localhost/kiln/base/ubuntu:jammy-20261101T000000Z-aarch64"),
    ("medical-cart-cpu", "quay.io/centos-bootc/centos-bootc:stream9@sha256:"
                         "3a75c664fbf8c540b0c75e9c0cac76828ee600bc58b4378c73a3d9a5eb2f0852"),
])
def test_a_class_builds_from_its_base_ref(name: str, ref: str) -> None:
    assert names.base_ref(load_class(name, ROOT / "images")) == ref


def test_an_unpinned_base_never_carries_a_snapshot_name() -> None:
    ref = names.offline_base_ref("bookworm", "x86_64", unpinned="e08460d4")
    assert ref == "localhost/kiln/base/debian:bookworm-unpinned-e08460d4"
    with pytest.raises(ValueError, match="pinned to a snapshot or unpinned"):
        names.offline_base_ref("bookworm", "x86_64", "20261101T000000Z", unpinned="e08460d4")
    main = names.finalize_unpinned_id("http://deb.debian.org/debian/", ("main",))
    assert main == names.finalize_unpinned_id("http://deb.debian.org/debian", ("main",))
    assert main != names.finalize_unpinned_id("http://deb.debian.org/debian", ("main", "non-free"))


def test_fallback_base_ref_of_a_class() -> None:
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    unpinned = names.finalize_unpinned_id("http://deb.debian.org/debian", tuple(hc.spec.base.components))
    assert names.base_ref(hc, fallback=True) == f"localhost/kiln/base/debian:bookworm-unpinned-{unpinned}"


def test_a_base_that_drops_modules_is_named_after_the_set() -> None:
    """Classes that keep every module never build FROM a base that lacks some, and the name does not
    depend on the order or on trailing slashes."""
    gpu_sound = names.finalize_modules_id(("drivers/gpu", "sound"))
    assert gpu_sound == names.finalize_modules_id(("sound/", "drivers/gpu")) != names.finalize_modules_id(("sound",))
    ref = names.offline_base_ref("bookworm", "x86_64", "20261101T000000Z", modules=gpu_sound)
    assert ref == f"localhost/kiln/base/debian:bookworm-20261101T000000Z-modules-{gpu_sound}"
