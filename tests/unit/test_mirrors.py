"""Where a bootstrap base comes from: the pinned snapshot, or the class's fallback mirror when the
snapshot is out of reach (probes replaced by a fake reachability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.base import capability, mirrors
from builder.base.bootstrap import BaseRecipe
from builder.image.build import finalize_base_record
from builder.image.render import finalize_plan
from builder.spec import names
from builder.spec.loader import load_class
from builder.spec.schema import Architecture

ROOT = Path(__file__).resolve().parents[2]
SNAPSHOT_HOST = "snapshot.debian.org"


@pytest.fixture
def snapshot_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(url: str, timeout: float = 0) -> bool:
        return SNAPSHOT_HOST not in url and "nvidia.github.io" not in url

    monkeypatch.setattr(mirrors, "reachable", fake)
    monkeypatch.setattr(capability, "reachable", fake)


def test_snapshot_reachable_is_the_first_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirrors, "reachable", lambda url, timeout=0: True)
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    where = mirrors.finalize_base_mirror(hc)
    assert (where.fallback, where.snapshot, where.note) == (False, "20261101T000000Z", "")
    assert where.ref == names.base_ref(hc) and where.url.startswith("http://snapshot.debian.org/")


def test_fallback_when_the_snapshot_is_out_of_reach(snapshot_down: None) -> None:
    hc = load_class("factory-gateway-gpu", ROOT / "images")
    where = mirrors.finalize_base_mirror(hc)
    assert where.fallback and where.snapshot is None and where.url == "http://deb.debian.org/debian"
    assert "-unpinned-" in where.ref and "20261101T000000Z" not in where.ref
    assert not any("base mirror" in why for why in capability.why_not_buildable(hc, tools=False))
    assert capability.finalize_notes(hc) == [where.note] and "unpinned" in where.note
    assert finalize_base_record(where) == {"mirror": "http://deb.debian.org/debian", "snapshot": None,
                                           "fallback": True}
    labels = dict(finalize_plan(hc, source="x", base=where).labels)
    assert labels["dev.kiln.base.mirror"] == "http://deb.debian.org/debian"
    assert labels["dev.kiln.base.snapshot"] == "unpinned"
    assert finalize_plan(hc, source="x", base=where).base_ref == where.ref


def test_no_fallback_means_not_buildable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(capability, "reachable", lambda url, timeout=0: False)
    hc = load_class("jetson-vision-standard", ROOT / "images")
    assert any(why.startswith("base mirror: needs snapshot.ubuntu.com")
               for why in capability.why_not_buildable(hc, tools=False))


def test_fallback_recipe_has_its_own_name_and_cache() -> None:
    common = dict(release="bookworm", arch=Architecture.x86_64, security_mirror=None,
                  components=("main", "non-free"), packages=("systemd",), epoch=0)
    pinned = BaseRecipe(mirror="http://snapshot.debian.org/archive/debian/20261101T000000Z",
                        snapshot="20261101T000000Z", **common)  # type: ignore[arg-type]
    fallback = BaseRecipe(mirror="http://deb.debian.org/debian", snapshot=None,
                          stands_in_for="20261101T000000Z", **common)  # type: ignore[arg-type]
    plain = BaseRecipe(mirror="http://deb.debian.org/debian", snapshot=None, **common)  # type: ignore[arg-type]
    assert pinned.ref.endswith(":bookworm-20261101T000000Z")
    assert fallback.ref.endswith(f":bookworm-unpinned-{fallback.unpinned_id}")
    assert plain.ref.endswith(":bookworm") and plain.name == "debian-bookworm-x86_64"
    assert len({pinned.name, fallback.name, plain.name}) == 3
