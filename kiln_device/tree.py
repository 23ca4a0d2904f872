"""Paths inside an unpacked image, resolved as if it were the root (a chroot): the image's links
never reach the running system's files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

MAX_LINKS = 40  # as Linux's MAXSYMLINKS


def resolve_in_tree(tree: Path, path: str) -> Path:
    """`path` (a device path, /usr/...) inside the tree at `tree`, every symlink on the way
    followed with `tree` as the root: an absolute target starts again at `tree`, and `..`
    stops at it. The result holds no symlink (it may not exist). A loop is OSError ELOOP."""
    todo = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    links = 0
    while todo:
        name = todo.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = tree.joinpath(*done, name)
        if not here.is_symlink():
            done.append(name)
            continue
        links += 1
        if links > MAX_LINKS:
            raise OSError(errno.ELOOP, f"{path} in the image: too many levels of symbolic links", str(here))
        target = os.readlink(here)
        if target.startswith("/"):
            done = []
        todo[:0] = [p for p in target.split("/") if p not in ("", ".")]
    return tree.joinpath(*done)
