"""Configuration: agent.json (baked defaults) overridden key by key by /etc/kiln/agent.json and
--config, and the running image's release.json."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_device.agent.errors import AgentError
from kiln_device.common import read_json
from kiln_device.contract import (
    AGENT_DEFAULTS,
    AGENT_JSON,
    AGENT_OVERRIDE_JSON,
    CONFIG,
    SLOTS,
    Release,
    default_repository,
    parse_release,
    under,
)

CONFIG_ENV = "KILN_AGENT_CONFIG"
ROOT_ENV = "KILN_AGENT_ROOT"
# Kept for readers of the old names.
DEFAULTS_FILE = AGENT_JSON
OVERRIDE_FILE = AGENT_OVERRIDE_JSON
BUILTIN = AGENT_DEFAULTS


@dataclass(frozen=True)
class Config:
    registry: str
    repository: str
    channel: str
    lookaside: str
    insecure: bool
    policy: Path
    release: Path
    state_dir: Path
    oci_dir: Path
    work_dir: Path
    esp: Path
    slots: dict[str, Path]
    partuuids: dict[str, str]
    cmdline: Path
    efivars: Path
    boot_id: Path
    reboot_command: tuple[str, ...]
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return f"docker://{self.registry}/{self.repository}"


def load_config(extra: str | None = None) -> tuple[Config, Release]:
    merged = dict(AGENT_DEFAULTS)
    root = Path(os.environ.get(ROOT_ENV) or "/")
    files = [under(root, AGENT_JSON), under(root, AGENT_OVERRIDE_JSON)]
    if extra:
        files.append(Path(extra))
    for path in files:
        if not path.exists():
            if path == Path(extra or ""):
                raise AgentError(CONFIG, f"{path}: no such config file")
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise AgentError(CONFIG, f"{path}: not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise AgentError(CONFIG, f"{path}: expected a JSON object")
        unknown = sorted(set(data) - set(AGENT_DEFAULTS) - {"$comment"})
        if unknown:
            raise AgentError(CONFIG, f"{path}: unknown keys {', '.join(unknown)} (known: {', '.join(AGENT_DEFAULTS)})")
        merged.update(data)
    release = load_release(Path(merged["release"]))
    try:
        config = Config(
            registry=str(merged["registry"]).removeprefix("docker://").rstrip("/"),
            repository=str(merged["repository"] or default_repository(release.cls)),
            channel=str(merged["channel"] or release.channel),
            lookaside=str(merged["lookaside"]).rstrip("/"),
            insecure=bool(merged["insecure"]),
            policy=Path(merged["policy"]), release=Path(merged["release"]),
            state_dir=Path(merged["stateDir"]), oci_dir=Path(merged["ociDir"]), work_dir=Path(merged["workDir"]),
            esp=Path(merged["esp"]),
            slots={s: Path(merged["slots"][s]) for s in SLOTS},
            partuuids={str(k): str(v) for k, v in dict(merged["partuuids"]).items()},
            cmdline=Path(merged["cmdline"]), efivars=Path(merged["efivars"]), boot_id=Path(merged["bootId"]),
            reboot_command=tuple(str(a) for a in merged["rebootCommand"]),
            raw=merged,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentError(CONFIG, f"agent configuration: bad value: {exc}") from None
    return config, release


def load_release(path: Path) -> Release:
    try:
        return parse_release(read_json(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AgentError(CONFIG, f"{path}: cannot read the release metadata: {exc}") from None


def require_registry(config: Config) -> None:
    missing = [k for k, v in (("registry", config.registry), ("lookaside", config.lookaside)) if not v]
    if missing:
        raise AgentError(CONFIG, f"no {' or '.join(missing)} configured: set it in {AGENT_OVERRIDE_JSON} "
                                 f"(defaults in {AGENT_JSON})")
    if not config.policy.is_file():
        raise AgentError(CONFIG, f"{config.policy}: the signature policy is missing; refusing to pull anything")


def read_boot_id(config: Config) -> str | None:
    try:
        return config.boot_id.read_text().strip() or None
    except OSError:
        return None
