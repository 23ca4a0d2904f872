"""Secrets masked in what Kiln prints (builder.core.secrets registers them; run(), errors and the CLI mask them).
No imports of Kiln's own: everything may use it."""

from __future__ import annotations

import re

MASK = "***"
# Flags whose value is a secret, wherever a command is shown (a second line of defence: Kiln passes none).
SECRET_FLAGS = re.compile(r"^(--(?:src-|dest-)?(?:creds|password|passphrase))(=.*)?$")

_known: set[str] = set()


def register(secret: str | None) -> None:
    """From now on, `redact` hides SECRET (and the USER:PASSWORD and base64 forms it travels in)."""
    if secret and len(secret) >= 4:
        _known.add(secret)


def redact(text: str) -> str:
    for secret in sorted(_known, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        m = SECRET_FLAGS.match(arg)
        if m and m.group(2):
            out.append(f"{m.group(1)}={MASK}")
        elif m:
            out.append(arg)
            hide_next = True
        else:
            out.append(redact(arg))
    return out

