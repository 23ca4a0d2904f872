"""Kiln's one version grammar and its one order, shared by the builder, the agent and systemd-boot.

A Kiln version is SemVer 2.0 restricted so that SemVer's precedence and systemd-boot's
(`strverscmp_improved`, which sorts boot entries by their `version` line) can never disagree:

    MAJOR.MINOR.PATCH[-PRE]      MAJOR, MINOR, PATCH: 0 or digits without a leading 0
                                 PRE: a lowercase word, then optional .NUMBER parts

    1.4.0   2.0.0-rc.1   2.0.0-beta   2.0.0-beta.2.1   0.0.0-dev

Refused, each because the two orders would part ways:
- build metadata (`1.0.0+b2`): SemVer ignores it, so two different images would be "equal";
- a numeric or second word part in PRE (`1.0.0-1`, `1.0.0-rc.1.hotfix`, `1.0.0-rc1`): SemVer sorts
  numbers below words, systemd above them; `rc1` vs `rc10` compares as text in SemVer;
- uppercase, leading zeros, more or fewer than three numbers (`v1.0`, `1.02.0`, `1.0`).

One type, `Version`, carries a checked version through the builder and the agent, with its order and
its renderings:

    v = Version.parse("2.0.0-rc.1")     # ValueError naming the grammar for anything else
    v < Version.parse("2.0.0")          # SemVer precedence, which is systemd-boot's order too
    v.tag                               # "2.0.0-rc.1": the OCI tag, and the name of its build/ folder
    v.entry                             # "2.0.0~rc.1": what its boot entry's name and `version` line carry
    Version.from_entry("2.0.0~rc.1")    # back from a boot entry

Boot entries carry the version with the PRE separator `-` written as `~`: `~` is what systemd-boot
sorts before a release; `-` there would sort `1.0.0-rc.1` above `1.0.0`.

`strverscmp_improved` below is a port of systemd's (src/fundamental/string-util-fundamental.c,
v252), for the agent's own check of what the boot loader will prefer; tests/unit/test_version.py
proves with hypothesis that it equals `systemd-analyze compare-versions`, and that `compare`
equals it on every version of the grammar.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER = r"(?:0|[1-9][0-9]*)"
VERSION_RE = re.compile(rf"({NUMBER})\.({NUMBER})\.({NUMBER})(?:-([a-z]+(?:\.{NUMBER})*))?")
ENTRY_VERSION_RE = re.compile(rf"{NUMBER}\.{NUMBER}\.{NUMBER}(?:~[a-z]+(?:\.{NUMBER})*)?")
MAX_LENGTH = 128
GRAMMAR = ("MAJOR.MINOR.PATCH with an optional -PRERELEASE of a lowercase word and .NUMBER parts "
           "(1.4.0, 2.0.0-rc.1); no leading zeros, no +build metadata")


@dataclass(frozen=True, order=True)
class Parsed:
    core: tuple[int, int, int]
    release: bool  # True: no pre-release part (sorts after every pre-release of the same core)
    word: str
    numbers: tuple[int, ...]


def check(version: str) -> str:
    """VERSION, or ValueError saying why it is not a Kiln version."""
    if not isinstance(version, str) or len(version) > MAX_LENGTH or not VERSION_RE.fullmatch(version):
        shown = repr(version[:40] + "...") if isinstance(version, str) and len(version) > 40 else repr(version)
        raise ValueError(f"{shown} is not a Kiln version: {GRAMMAR}")
    return version


def is_valid(version: str) -> bool:
    try:
        check(version)
    except ValueError:
        return False
    return True


def parse(version: str) -> Parsed:
    m = VERSION_RE.fullmatch(check(version))
    assert m is not None
    pre = m.group(4)
    word, *numbers = pre.split(".") if pre else ("",)
    return Parsed((int(m.group(1)), int(m.group(2)), int(m.group(3))), pre is None, word,
                  tuple(int(n) for n in numbers))


def compare(a: str, b: str) -> int:
    """SemVer 2.0 precedence of two Kiln versions: -1, 0 or 1 (ValueError for anything else)."""
    pa, pb = parse(a), parse(b)
    return (pa > pb) - (pa < pb)


@dataclass(frozen=True)
class Version:
    """A checked Kiln version: ordered by SemVer precedence (= systemd-boot's order on its entry text)."""

    text: str

    def __post_init__(self) -> None:
        check(self.text)

    @classmethod
    def parse(cls, text: str) -> Version:
        return cls(text)

    @classmethod
    def of(cls, value: Version | str) -> Version:
        """VALUE as a Version (a Version as it is; a string checked)."""
        return value if isinstance(value, Version) else cls(value)

    @classmethod
    def from_entry(cls, text: str) -> Version | None:
        """The version a boot entry names (`~` back to `-`); None for an entry of another grammar."""
        if not ENTRY_VERSION_RE.fullmatch(text):
            return None
        return cls(text.replace("~", "-", 1))

    @property
    def key(self) -> Parsed:
        return parse(self.text)

    @property
    def tag(self) -> str:
        """The OCI tag (and build/ folder name): the version itself, whose grammar is tag-safe."""
        return self.text

    @property
    def entry(self) -> str:
        """As a boot entry carries it (its file name and `version` line): `-` before PRE as `~`."""
        return self.text.replace("-", "~", 1)

    @property
    def prerelease(self) -> bool:
        return not self.key.release

    def __lt__(self, other: Version) -> bool:
        return self.key < other.key

    def __le__(self, other: Version) -> bool:
        return self.key <= other.key

    def __gt__(self, other: Version) -> bool:
        return self.key > other.key

    def __ge__(self, other: Version) -> bool:
        return self.key >= other.key

    def __str__(self) -> str:
        return self.text


# --- systemd's order ------------------------------------------------------------------------


def _valid_char(c: str) -> bool:
    return (c.isascii() and c.isalnum()) or c in "~-^."


def strverscmp_improved(a: str, b: str) -> int:
    """systemd 252's strverscmp_improved: -1, 0 or 1 (how systemd-boot orders entry versions).

    Segments are runs of digits or of letters; other characters separate them. Before a segment,
    '~' makes a string older (a pre-release), then the end of a string makes it older, then
    '-', '^' and '.' each make it older than a string without that mark there (one check after
    the other, each consuming its character: so 1^1 sorts above 1-1 and below 1.1). Numbers compare by value (leading
    zeros dropped) and are newer than letters; letters compare as text, longer newer."""
    i = j = 0
    na, nb = len(a), len(b)

    def at(s: str, k: int) -> str:
        return s[k] if k < len(s) else ""

    while True:
        while i < na and not _valid_char(a[i]):
            i += 1
        while j < nb and not _valid_char(b[j]):
            j += 1
        for mark in ("~", "", "-", "^", "."):
            ca, cb = at(a, i), at(b, j)
            if not mark:  # the end of either string: the longer is newer
                if not ca or not cb:
                    return _cmp(ca, cb)
            elif ca == mark or cb == mark:  # the string with the mark here is older
                r = _cmp(ca != mark, cb != mark)
                if r:
                    return r
                i, j = i + 1, j + 1
        ca, cb = at(a, i), at(b, j)
        if _digit(ca) or _digit(cb):
            ea, eb = _span(a, i, _digit), _span(b, j, _digit)
            r = _cmp(ea != i, eb != j)  # a number is newer than no number (letters, or nothing)
            if r:
                return r
            while i < na and a[i] == "0":
                i += 1
            while j < nb and b[j] == "0":
                j += 1
            r = _cmp(ea - i, eb - j) or _cmp(a[i:ea], b[j:eb])
            if r:
                return r
        else:
            ea, eb = _span(a, i, _alpha), _span(b, j, _alpha)
            n = min(ea - i, eb - j)
            r = _cmp(a[i:i + n], b[j:j + n]) or _cmp(ea - i, eb - j)
            if r:
                return r
        i, j = ea, eb


def _digit(c: str) -> bool:
    return "0" <= c <= "9" if c else False


def _alpha(c: str) -> bool:
    return ("a" <= c <= "z" or "A" <= c <= "Z") if c else False


def _span(s: str, start: int, pred: object) -> int:
    end = start
    while end < len(s) and pred(s[end]):  # type: ignore[operator]
        end += 1
    return end


def _cmp(x: object, y: object) -> int:
    return int(x > y) - int(x < y)  # type: ignore[operator]
