"""Where a value came from in a spec file: a path into the document and its file:line."""

from __future__ import annotations

Loc = tuple[str | int, ...]


def format_loc(loc: Loc) -> str:
    """spec.models[0].precision"""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def where(lines: dict[Loc, str], loc: Loc, source: str) -> str:
    """The file:line of loc, or of its closest ancestor that has one."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return source
