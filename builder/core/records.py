"""Build records: build/<class>/<version>/build.json, what `kiln build` made and where it went.

    record = read_record("qemu-x86_64", "1.0.0")
    record["image"]["id"], record["layers"], record["pushed"], record["signatures"]
    write_record(record)     # atomically, at paths.record_path(class, version)
"""

from __future__ import annotations

import json
from typing import Any

from builder.core import paths
from builder.core.errors import BuildError
from builder.core.files import write_json_atomic

RECORD_SCHEMA = 1


def write_record(record: dict[str, Any]) -> None:
    """Write RECORD where it belongs (its class and version name the place)."""
    write_json_atomic(paths.record_path(record["class"], record["version"]), record)


def read_record(cls: str, version: str) -> dict[str, Any]:
    path = paths.record_path(cls, version)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{cls} {version} has not been built here ({path} is missing); "
                         f"run `kiln build {cls} --version {version}` first") from None
    except ValueError as exc:
        raise BuildError(f"{path}: not a build record ({exc}); rebuild it") from None
    if not isinstance(data, dict) or data.get("schemaVersion") != RECORD_SCHEMA:
        raise BuildError(f"{path}: unknown build record format; rebuild it")
    return data


def describe(record: dict[str, Any]) -> str:
    """A few lines for humans after a build."""
    img = record["image"]
    lines = [f"built {img['ref']}  {img['id'][:19]}  {img['size'] / 1e6:.0f} MB"]
    groups: dict[str, int] = {}
    for layer in record["layers"]:
        groups[layer["group"]] = groups.get(layer["group"], 0) + (layer["size"] or 0)
    lines.append("layers: " + ", ".join(f"{g} {n / 1e6:.1f} MB" for g, n in groups.items()))
    lines += [f"model {m['name']} {m['version']}: {m['precision']} {m['sha256'][:19]}" for m in record["models"]]
    lines += [f"pushed {p['byDigest']}" for p in record.get("pushed", [])]
    lines.append(f"record: {paths.record_path(record['class'], record['version'])}")
    return "\n".join(lines)
