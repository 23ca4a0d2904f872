"""A device's own files, put in its /etc when its disk is written: `kiln disk --etc DEST=FILE`.

The image is the same for every device of a class; what differs per device (the agent's
registry and channel, a site's drop-ins, its fleet enrollment token and the fleet CA) goes in the data
partition's /etc overlay (overlay/etc/upper), which the initramfs stacks over the image's /etc.
So the file is there from the first boot, survives updates (the overlay is not in a slot), and
is gone after a factory reset, like everything else the device wrote.

DEST is relative to /etc (`kiln/agent.json`, `systemd/system/kiln-agent.timer.d/site.conf`).
The file keeps its permission bits and is owned by root. `kiln/agent.json` is checked here as
the agent would read it, so a typo fails at flash time and not on a device in the field.
"""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from builder.core.errors import UsageError
from builder.core.files import sha256_file
from kiln_device.contract import AGENT_OVERRIDE_JSON, ContractError, parse_agent_file

ETC_UPPER = "overlay/etc/upper"  # in the data partition (builder.disk.assemble.DATA_DIRS)
MAX_FILE = 1 << 20  # configuration, not payload
AGENT_DEST = PurePosixPath(AGENT_OVERRIDE_JSON).relative_to("/etc")


@dataclass(frozen=True)
class EtcFile:
    dest: PurePosixPath  # relative to /etc
    source: Path

    def record(self) -> dict[str, Any]:
        """What the disk record says: where and which bytes (a digest, never the content)."""
        return {"path": f"/etc/{self.dest}", "sha256": sha256_file(self.source),
                "mode": f"{stat.S_IMODE(self.source.stat().st_mode):04o}"}


def parse_etc(spec: str) -> EtcFile:
    """DEST=FILE -> EtcFile, or a UsageError that names the option and says what is wrong."""
    where = f"--etc {spec}"
    dest_text, sep, source_text = spec.partition("=")
    if not sep or not dest_text or not source_text:
        raise UsageError(f"{where}: expected DEST=FILE (DEST relative to /etc, e.g. kiln/agent.json=./agent.json)")
    dest = PurePosixPath(dest_text)
    if dest.is_absolute() or any(part in ("", ".", "..") for part in dest_text.split("/")):
        raise UsageError(f"{where}: DEST must be a plain path under /etc without '.' or '..' parts, "
                         f"e.g. kiln/agent.json")
    source = Path(source_text)
    if not source.is_file():
        raise UsageError(f"{where}: {source} is not a file")
    if source.stat().st_size > MAX_FILE:
        raise UsageError(f"{where}: {source} is {source.stat().st_size} bytes; files for /etc are configuration "
                         f"(at most {MAX_FILE} bytes)")
    found = EtcFile(dest, source)
    if dest == AGENT_DEST:
        check_agent_config(found)
    return found


def check_agent_config(found: EtcFile) -> None:
    """The override the agent reads key by key over the image's defaults, checked by the agent's own record."""
    where = f"--etc {found.dest}={found.source}"
    try:
        data = json.loads(found.source.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{where}: not valid JSON: {exc}") from None
    try:
        parse_agent_file(data, where)  # the agent's own record: known keys, their types (kiln_device.contract)
    except ContractError as exc:
        raise UsageError(str(exc)) from None


def check_unique(files: Sequence[EtcFile]) -> None:
    seen: set[PurePosixPath] = set()
    for f in files:
        if f.dest in seen:
            raise UsageError(f"--etc: /etc/{f.dest} is given twice")
        seen.add(f.dest)


def place_etc_files(files: Sequence[EtcFile], data_tree: Path) -> None:
    """Copy each file into the data partition's tree (its /etc overlay's upper dir), mode kept."""
    check_unique(files)
    for f in files:
        upper = data_tree / ETC_UPPER
        target = upper / f.dest
        target.parent.mkdir(parents=True, exist_ok=True)
        for parent in f.dest.parents:  # kiln, then . (the upper dir itself keeps its mode)
            if str(parent) != ".":
                (upper / parent).chmod(0o755)
        shutil.copyfile(f.source, target)
        target.chmod(stat.S_IMODE(f.source.stat().st_mode))
