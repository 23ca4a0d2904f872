"""Configuration: agent.json (baked defaults) overridden key by key by /etc/kiln/agent.json and
--config, and the running image's release.json."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln_device.common import read_json
from kiln_device.contract import (
    AGENT_DEFAULTS,
    AGENT_JSON,
    AGENT_OVERRIDE_JSON,
    CONFIG,
    LAYERS_DIR,
    RUNNING_LAYERS,
    SLOTS,
    TRUST_DIR,
    TRUST_ROOT,
    AgentFile,
    AgentFleet,
    ContractError,
    Release,
    default_repository,
    merge_agent_files,
    parse_agent_file,
    parse_release,
    under,
    window_minutes,
)
from kiln_device.errors import AgentError
from kiln_device.typed import dump

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
    serial: str | None = None  # None: the firmware's (kiln_device.agent.report.device_serial)


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
    layers_dir: Path = Path(LAYERS_DIR)  # the layer store (kiln_device.layers)
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
        if path != files[0] and isinstance(data.get("trustRoot"), str) and not Path(data["trustRoot"]).is_file():
            # An override that names a TUF root asks for a verified channel: without that file the agent would
            # fall back to tags and signatures alone, which is the check the override asked to raise.
            raise AgentError(CONFIG, f"{path}: trustRoot: {data['trustRoot']} is not a file; refusing to read the "
                                     "channel without the TUF root this configuration names")
    where = ", ".join(str(p) for p in files if p.exists())
    try:
        agent = parse_agent_file(merge_agent_files(*found), f"the agent configuration ({where})")
    except ContractError as exc:
        raise AgentError(CONFIG, str(exc)) from None
    release = load_release(Path(agent.release))
    config = Config(
        registry=agent.registry.removeprefix("docker://").rstrip("/"),
        repository=agent.repository or default_repository(release.cls),
        channel=agent.channel or release.channel,
        lookaside=agent.lookaside.rstrip("/"),
        insecure=agent.insecure,
        policy=Path(agent.policy), release=Path(agent.release),
        state_dir=Path(agent.state_dir), oci_dir=Path(agent.oci_dir), work_dir=Path(agent.work_dir),
        layers_dir=Path(agent.layers_dir), running_layers=under(root, RUNNING_LAYERS),
        trust_root=Path(agent.trust_root), trust_dir=Path(agent.trust_dir),
        esp=Path(agent.esp),
        slots={s: Path(agent.slots[s]) for s in SLOTS},
        partuuids=dict(agent.partuuids),
        cmdline=Path(agent.cmdline), efivars=Path(agent.efivars), boot_id=Path(agent.boot_id),
        reboot_command=agent.reboot_command,
        timeouts=Timeouts(check=agent.timeouts.check, fetch=agent.timeouts.fetch, unpack=agent.timeouts.unpack,
                          build=agent.timeouts.build),
        fleet=fleet_of(agent.fleet), window=window_minutes(agent.window),
        raw=dump(agent),
    )
    return config, release


def fleet_of(fleet: AgentFleet) -> Fleet:
    return Fleet(url=fleet.url.rstrip("/"), ca=Path(fleet.ca), token=Path(fleet.token), outbox_max=fleet.outbox_max,
                 batch=min(fleet.batch, fleet.outbox_max), identity=fleet.identity, serial=fleet.serial)


def _one(name: str, value: Any) -> AgentFile:
    try:
        return parse_agent_file({name: value}, "agent.json")
    except ContractError as exc:
        raise AgentError(CONFIG, str(exc)) from None


def finalize_timeouts(value: Any) -> Timeouts:
    """agent.json `timeouts` (an override's few keys over the defaults); AgentError(CONFIG) naming the key."""
    t = _one("timeouts", value).timeouts
    return Timeouts(check=t.check, fetch=t.fetch, unpack=t.unpack, build=t.build)


def finalize_fleet(value: Any) -> Fleet:
    """agent.json `fleet`; AgentError(CONFIG) naming the key."""
    return fleet_of(_one("fleet", value).fleet)


def parse_window(value: Any) -> tuple[int, int] | None:
    """agent.json `window`: "HH:MM-HH:MM" in UTC (may wrap past midnight); "" for none."""
    return window_minutes(_one("window", "" if value is None else value).window)


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
