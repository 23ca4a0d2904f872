"""The channel's signed metadata, as the builder writes it and the device reads it: the TUF target of each
release and its `custom` fields, and the rollout state the delegated `rollout` role signs. Part of the
device contract (docs/device-contract.md); records as kiln_device.typed makes them. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln_device.typed import key, load


def target_path(cls: str, channel: str, version: str) -> str:
    """A release's TUF target: `<class>/<channel>/<version>` (its length and sha256: the OCI manifest's)."""
    return f"{cls}/{channel}/{version}"


def rollout_path(cls: str, channel: str) -> str:
    """The channel's rollout state, a target of the delegated `rollout` role (builder.release.rollout)."""
    return f"{cls}/{channel}/rollout"


@dataclass(frozen=True)
class Withdrawn:
    reason: str = key("reason", "Why the release was withdrawn (`kiln channel withdraw --reason`).")
    time: str = key("time", "When, in UTC (`2026-12-06T10:00:00Z`).")


@dataclass(frozen=True)
class TargetCustom:
    """A release target's `custom` object in the channel's signed targets metadata."""

    version: str = key("version", "The release's version: the same as the last part of its target path.",
                       nonempty=True)
    compatible: str = key("compatible", "Which devices may install it (release.json `compatible`).")
    min_version: str = key("minVersion", "The oldest version that may update to it directly (empty: any).",
                           default="")
    repository: str = key("repository", "The registry repository it is pulled from (empty: `kiln/<class>`).",
                          default="")
    withdrawn: Withdrawn | None = key("withdrawn", "Set once the release is withdrawn: devices no longer choose "
                                                   "it.", default=None)


def parse_target_custom(data: Any, where: str) -> TargetCustom:
    """A target's `custom`; ContractError naming the field. Fields this reader does not know are ignored:
    the metadata is signed, and a later Kiln may add some."""
    return load(TargetCustom, data, where, ignore_unknown=True)


@dataclass(frozen=True)
class RolloutStage:
    percent: int = key("percent", "Cumulative share of the devices the wave reaches.", positive=True)
    soak_hours: int = key("soakHours", "How long the wave soaks before the next may open.", default=0)


@dataclass(frozen=True)
class RolloutHalt:
    reason: str = key("reason", "Why the rollout was halted.")
    time: str = key("time", "When, in UTC.", default="")
    by: str = key("by", "Who halted it: a person (`kiln rollout halt`) or the fleet service.", default="")


@dataclass(frozen=True)
class RolloutClosed:
    version: str = key("version", "A release whose rollout another replaced before it finished.")
    wave: int = key("wave", "The waves it had reached: only their devices may still take it.", default=0)
    halted: bool = key("halted", "It was halted: no device falls back to it.", default=False)


@dataclass(frozen=True)
class Rollout:
    """The channel's rollout state (builder.release.rollout writes it; kiln_device.fleet.rollout_gate reads it)."""

    version: str = key("version", "The release being rolled out.", nonempty=True)
    stages: tuple[RolloutStage, ...] = key("stages", "The waves, in order.", default=(RolloutStage(percent=100),))
    wave: int = key("wave", "How many waves are open.", default=0)
    opened: tuple[str, ...] = key("opened", "When each open wave opened, in UTC.", default=())
    halted: RolloutHalt | None = key("halted", "Set while the rollout is halted.", default=None)
    resumed: str | None = key("resumed", "When a halt was last lifted.", default=None)
    closed: tuple[RolloutClosed, ...] = key("closed", "Releases whose rollouts this one replaced unfinished.",
                                            default=())
    max_failure_rate: str = key("maxFailureRate", "The failure rate of the open waves over which the fleet "
                                                  "service halts it (a decimal string: TUF's JSON has no floats).",
                                default="")
    halt_min_devices: int = key("haltMinDevices", "How many devices must have reported before it may halt.",
                                default=0)
    auto_promote: bool = key("autoPromote", "The fleet service opens the next wave once one has soaked.",
                             default=False)


def parse_rollout(data: Any, where: str) -> Rollout:
    """The rollout target's `custom`; ContractError naming the field. Unknown keys are ignored (signed; a later
    Kiln may add some)."""
    return load(Rollout, data, where, ignore_unknown=True)
