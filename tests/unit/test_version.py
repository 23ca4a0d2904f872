"""One version grammar, one order: Kiln's (SemVer on the grammar), the agent's port of systemd's
strverscmp_improved, and systemd-boot's own (`systemd-analyze compare-versions`, systemd 252) agree.

The two findings this closes (issue 13): `1.0.0-rc.1 -> 1.0.0` (the agent took 1.0.0, systemd-boot
booted rc.1, a false rollback) and `v1.0` vs `99.0` (ordered differently by the two).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln_device import version as kv
from tests.conftest import require_tool

pytestmark = pytest.mark.unit

ANALYZE_ORDER = {0: 0, 11: 1, 12: -1}  # systemd-analyze compare-versions A B: exit 0 (=), 11 (>), 12 (<)


def systemd_order(a: str, b: str) -> int:
    proc = subprocess.run([require_tool("systemd-analyze"), "compare-versions", "--", a, b], capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode in ANALYZE_ORDER, proc.stderr
    return ANALYZE_ORDER[proc.returncode]


numbers = st.one_of(st.integers(0, 12), st.integers(0, 10**12))
words = st.text(alphabet="abcrz", min_size=1, max_size=5)
prereleases = st.one_of(st.none(), st.tuples(words, st.lists(numbers, max_size=3)).map(
    lambda t: ".".join([t[0], *map(str, t[1])])))
versions = st.tuples(numbers, numbers, numbers, prereleases).map(
    lambda t: f"{t[0]}.{t[1]}.{t[2]}" + (f"-{t[3]}" if t[3] else ""))
# Anything systemd might meet: its separators, digits with leading zeros, letters, junk.
any_text = st.text(alphabet="0123456789abzAZ.~-^_+", max_size=12)


@settings(max_examples=300, deadline=None)
@given(versions, versions)
def test_kiln_order_is_systemd_boot_order_on_every_version_of_the_grammar(a: str, b: str) -> None:
    assert kv.is_valid(a) and kv.is_valid(b)
    va, vb = kv.Version(a), kv.Version(b)
    expected = systemd_order(va.entry, vb.entry)
    assert kv.compare(a, b) == expected
    assert (va > vb) - (va < vb) == expected  # the one type orders as the grammar does
    assert kv.strverscmp_improved(va.entry, vb.entry) == expected
    assert kv.Version.from_entry(va.entry) == va and va.tag == a


@settings(max_examples=400, deadline=None)
@given(any_text, any_text)
def test_the_port_of_strverscmp_improved_is_systemds(a: str, b: str) -> None:
    assert kv.strverscmp_improved(a, b) == systemd_order(a, b)


@pytest.mark.parametrize(("a", "b"), [
    ("1.0.0-rc.1", "1.0.0"), ("1.0.0-alpha", "1.0.0-alpha.1"), ("1.0.0-alpha.1", "1.0.0-beta"),
    ("1.0.0-beta.2", "1.0.0-beta.11"), ("1.0.0-rc.1", "1.0.0-rc.1.0"), ("1.9.0", "1.10.0"),
    ("0.0.0-dev", "0.0.0"), ("1.0.0-alpha", "1.0.0-alphab"), ("2.0.0-rc.9", "2.0.0"),
])
def test_semver_examples_in_order_for_kiln_and_systemd_boot(a: str, b: str) -> None:
    assert kv.compare(a, b) == -1 and kv.compare(b, a) == 1
    assert systemd_order(kv.Version(a).entry, kv.Version(b).entry) == -1
    assert sorted([kv.Version(b), kv.Version(a)]) == [kv.Version(a), kv.Version(b)]


def test_the_findings_systemd_order_of_the_old_grammar_disagreed() -> None:
    """What systemd-boot did with the versions the old grammar allowed: the reason they are refused."""
    assert systemd_order("1.0.0-rc.1", "1.0.0") == 1  # '-' in an entry: rc.1 sorted above the release
    assert systemd_order("v1.0", "99.0") == -1  # the old agent ordered v1.0 above 99.0
    assert systemd_order("1.0.0~rc.1", "1.0.0") == -1  # '~', which entries now carry: below it


@pytest.mark.parametrize("bad", [
    "v1.0", "1.0", "1.0.0.0", "01.0.0", "1.02.0", "1.0.0+b2", "1.0.0-1", "1.0.0-rc1", "1.0.0-RC.1",
    "1.0.0-rc.1.hotfix", "1.0.0-rc.01", "1.0.0~rc.1", "1.0.0-", "", "1.0.0 ", "1.².0", "9" * 200,
])
def test_versions_outside_the_grammar_are_refused_with_the_grammar(bad: str) -> None:
    with pytest.raises(ValueError, match=r"is not a Kiln version: MAJOR\.MINOR\.PATCH"):
        kv.check(bad)
    assert not kv.is_valid(bad)
    with pytest.raises(ValueError, match="is not a Kiln version"):
        kv.Version(bad)


def test_boot_entries_carry_the_prerelease_as_tilde_and_parse_back() -> None:
    from kiln_device import contract

    name = contract.entry_name("1.0.0-rc.1", "b", 3)
    assert name == "kiln-1.0.0~rc.1-b+3.conf"
    entry = contract.parse_entry_name(name)
    assert entry is not None and (entry.version, entry.slot, entry.tries_left) == ("1.0.0-rc.1", "b", 3)
    text = contract.render_entry(cls="c", version="1.0.0-rc.1", slot="b", partuuid="x", kargs=[])
    assert "\nversion 1.0.0~rc.1\n" in text and "sort-key kiln" in text
    # The finding: rc.1 -> 1.0.0. systemd-boot now prefers the release's entry, as the agent does.
    assert systemd_order(kv.Version("1.0.0").entry, kv.Version("1.0.0-rc.1").entry) == 1
    # an entry of another grammar (a kernel's own, say) is no Kiln version: parsed back as it is
    assert kv.Version.from_entry("6.1.0-13-amd64") is None
    other = contract.parse_entry_name("kiln-6.1.0-13-amd64-a.conf")
    assert other is not None and other.version == "6.1.0-13-amd64"


@pytest.mark.parametrize("label", ["v1.0", "1.0.0+b2", "1.0.0-rc1", "01.0.0"])
def test_an_image_whose_version_label_is_outside_the_grammar_is_a_bad_image(label: str) -> None:
    from kiln_device.agent.versions import candidate_from_labels
    from kiln_device.contract import BAD_IMAGE, LABEL_COMPATIBLE, LABEL_VERSION
    from kiln_device.errors import AgentError

    with pytest.raises(AgentError) as err:
        candidate_from_labels({LABEL_VERSION: label, LABEL_COMPATIBLE: "kiln,c"}, "sha256:" + "a" * 64)
    assert err.value.code == BAD_IMAGE and "MAJOR.MINOR.PATCH" in err.value.message


def test_the_release_report_compares_with_the_previous_release_in_kiln_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review (issue 33, 14): the release report found "the previous release" by PEP 440, a third
    order: it skipped every version PEP 440 cannot read (1.1.0-hotfix) and put 1.2.0-dev below 1.2.0-alpha."""
    from builder.release.report import previous_record

    monkeypatch.setenv("KILN_PROJECT_DIR", str(tmp_path))
    for version in ("1.0.0", "1.1.0-hotfix", "1.2.0-alpha", "1.2.0-dev", "1.3.0"):
        d = tmp_path / "build/cls" / version
        d.mkdir(parents=True)
        (d / "build.json").write_text(json.dumps({"version": version, "manifest": "sha256:" + "0" * 64}))
    unpushed = tmp_path / "build/cls/1.2.0-rc.1"
    unpushed.mkdir()
    (unpushed / "build.json").write_text(json.dumps({"version": "1.2.0-rc.1"}))  # never pushed signed: skipped

    def prev(version: str) -> str | None:
        rec = previous_record("cls", version)
        return rec["version"] if rec else None

    assert prev("1.1.0") == "1.1.0-hotfix"
    assert prev("1.2.0") == "1.2.0-dev"  # Kiln (and systemd-boot): words compare as text, alpha < dev
    assert prev("1.2.0-dev") == "1.2.0-alpha"
    assert prev("1.0.0") is None
