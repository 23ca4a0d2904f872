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
    IDENTITY_MODES,
    LAYERS_DIR,
    RUNNING_LAYERS,
    SLOTS,
    TRUST_DIR,
    TRUST_ROOT,
    ContractError,
    Release,
    default_repository,
    merge_agent_files,
    parse_agent_file,
    parse_release,
    under,
)
from kiln_device.fleet import MAX_EVENTS

CONFIG_ENV = "KILN_AGENT_CONFIG"
ROOT_ENV = "KILN_AGENT_ROOT"
# Kept for readers of the old names.
DEFAULTS_FILE = AGENT_JSON
OVERRIDE_FILE = AGENT_OVERRIDE_JSON
BUILTIN = AGENT_DEFAULTS


@dataclass(frozen=True)
class Timeouts:
    """Seconds each external step may run (agent.json `timeouts`); past it the step fails and the lock goes."""

    check: float
    fetch: float
    unpack: float
    build: float


@dataclass(frozen=True)
class Fleet:
    """agent.json `fleet`: the optional fleet service the outbox is uploaded to (docs/fleet.md)."""

    url: str = ""
    ca: Path = Path(AGENT_DEFAULTS["fleet"]["ca"])
    token: Path = Path(AGENT_DEFAULTS["fleet"]["token"])
    outbox_max: int = AGENT_DEFAULTS["fleet"]["outboxMax"]
    batch: int = AGENT_DEFAULTS["fleet"]["batch"]
    identity: str = AGENT_DEFAULTS["fleet"]["identity"]  # auto, tpm or file (kiln_device.agent.identity)


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
    timeouts: Timeouts = field(default_factory=lambda: Timeouts(**AGENT_DEFAULTS["timeouts"]))
    raw: dict[str, Any] = field(default_factory=dict)
    # The image's TUF root (absent: an image from before trusted channels: tags and signatures only),
    # and the TUF client's trusted metadata on the data partition.
    trust_root: Path = Path(TRUST_ROOT)
    trust_dir: Path = Path(TRUST_DIR)
    fleet: Fleet = field(default_factory=Fleet)
    window: tuple[int, int] | None = None  # maintenance window, minutes after 00:00 UTC [start, end)
    layers_dir: Path = Path(LAYERS_DIR)  # the layer store (kiln_device.agent.layers)
    running_layers: Path = Path(RUNNING_LAYERS)  # the booted root's layer list (absent: a whole-root slot)

    @property
    def outbox_dir(self) -> Path:
        return self.state_dir / "outbox"

    @property
    def identity_dir(self) -> Path:
        return self.state_dir.parent / "identity"

    @property
    def source(self) -> str:
        return f"docker://{self.registry}/{self.repository}"


def load_config(extra: str | None = None) -> tuple[Config, Release]:
    root = Path(os.environ.get(ROOT_ENV) or "/")
    files = [under(root, AGENT_JSON), under(root, AGENT_OVERRIDE_JSON)]
    if extra:
        files.append(Path(extra))
    found = []
    for path in files:
        if not path.exists():
            if path == Path(extra or ""):
                raise AgentError(CONFIG, f"{path}: no such config file")
            continue
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise AgentError(CONFIG, f"{path}: not valid JSON: {exc}") from None
        try:
            parse_agent_file(data, str(path))  # each file's own keys and types, named by its path
        except ContractError as exc:
            raise AgentError(CONFIG, str(exc)) from None
        found.append(data)
    merged = merge_agent_files(*found)
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
            layers_dir=Path(merged["layersDir"]), running_layers=under(root, RUNNING_LAYERS),
            trust_root=Path(merged["trustRoot"]), trust_dir=Path(merged["trustDir"]),
            esp=Path(merged["esp"]),
            slots={s: Path(merged["slots"][s]) for s in SLOTS},
            partuuids={str(k): str(v) for k, v in dict(merged["partuuids"]).items()},
            cmdline=Path(merged["cmdline"]), efivars=Path(merged["efivars"]), boot_id=Path(merged["bootId"]),
            reboot_command=tuple(str(a) for a in merged["rebootCommand"]),
            timeouts=finalize_timeouts(merged["timeouts"]),
            fleet=finalize_fleet(merged["fleet"]), window=parse_window(merged["window"]),
            raw=merged,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AgentError(CONFIG, f"agent configuration: bad value: {exc}") from None
    return config, release


def nested(name: str, value: Any, what: str) -> dict[str, Any]:
    """An object of agent.json (timeouts, fleet) merged over its defaults; unknown keys refused."""
    known = AGENT_DEFAULTS[name]
    if not isinstance(value, dict):
        raise AgentError(CONFIG, f"{name}: expected an object with {what}{', '.join(known)}")
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise AgentError(CONFIG, f"{name}: unknown keys {', '.join(unknown)} (known: {', '.join(known)})")
    return {**known, **value}


def finalize_timeouts(value: Any) -> Timeouts:
    merged = nested("timeouts", value, "seconds for ")
    for key, seconds in value.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise AgentError(CONFIG, f"timeouts.{key}: expected a number of seconds above 0, got {seconds!r}")
    return Timeouts(**merged)


def finalize_fleet(value: Any) -> Fleet:
    merged = nested("fleet", value, "")
    url = str(merged["url"]).rstrip("/")
    if url and not url.startswith("https://"):
        raise AgentError(CONFIG, f"fleet.url: {url!r}: the fleet service is reached over TLS (https://HOST:PORT)")
    for key, most in (("outboxMax", 1_000_000), ("batch", MAX_EVENTS)):
        n = merged[key]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= most:
            raise AgentError(CONFIG, f"fleet.{key}: expected a whole number from 1 to {most}, got {n!r}")
    if merged["identity"] not in IDENTITY_MODES:
        raise AgentError(CONFIG, f"fleet.identity: expected one of {', '.join(IDENTITY_MODES)} (where the device "
                                 f"key is made), got {merged['identity']!r}")
    return Fleet(url=url, ca=Path(merged["ca"]), token=Path(merged["token"]), outbox_max=merged["outboxMax"],
                 batch=min(merged["batch"], merged["outboxMax"]), identity=merged["identity"])


def parse_window(value: Any) -> tuple[int, int] | None:
    """agent.json `window`: "HH:MM-HH:MM" in UTC (may wrap past midnight); "" for none."""
    if value in ("", None):
        return None
    import re

    m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)", str(value))
    if not m:
        raise AgentError(CONFIG, f"window: {value!r}: expected HH:MM-HH:MM (UTC), for example 02:00-04:30")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise AgentError(CONFIG, f"window: {value!r}: an empty window; leave it out for any time")
    return start, end


def in_window(window: tuple[int, int] | None, minute: int) -> bool:
    if window is None:
        return True
    start, end = window
    return start <= minute < end if start < end else (minute >= start or minute < end)


def load_release(path: Path) -> Release:
    """release.json at `path`; AgentError(CONFIG) naming the file, and the field where it is malformed."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise AgentError(CONFIG, f"{path}: cannot read the release metadata: {exc}") from None
    try:
        return parse_release(data, str(path))
    except ContractError as exc:
        raise AgentError(CONFIG, f"malformed release metadata: {exc}") from None


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
