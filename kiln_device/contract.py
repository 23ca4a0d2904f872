"""What the builder and the device agree on, spelled out once.

Paths on the device, the files the builder bakes for the device (release.json,
class.json, agent.json) and their fields, the boot entry names and text, the erofs
compressors, the OCI labels and the agent's exit codes. The builder imports this
module; the device code reads nothing from the builder but these names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from kiln_device import version as kv
from kiln_device.typed import ContractError as ContractError
from kiln_device.typed import dump, key, load

# --- paths on the device ---------------------------------------------------------------

PATHS: dict[str, str] = {}  # device path -> what it is (docs/device-contract.md lists them)


def _path(path: str, doc: str) -> str:
    PATHS[path] = doc
    return path


LIB_DIR = _path("/usr/lib/kiln", "Read-only: what the image brings.")
DATA_DIR = _path("/var/lib/kiln", "What the device keeps, on the data partition's /var overlay.")
RELEASE_JSON = _path(f"{LIB_DIR}/release.json", "What the image says about itself: the `release.json` record.")
CLASS_JSON = _path(f"{LIB_DIR}/class.json", "The whole class spec, for people and `kiln disk`; the agent never "
                                            "reads it.")
AGENT_JSON = _path(f"{LIB_DIR}/agent.json", "The agent's baked configuration: the `agent.json` record.")
AGENT_OVERRIDE_JSON = _path("/etc/kiln/agent.json", "The device's own agent configuration, over the baked one key "
                                                    "by key (`kiln disk --etc`).")
POLICY_JSON = _path(f"{LIB_DIR}/policy.json", "The containers signature policy: updates must be signed by the "
                                              "release key.")
RELEASE_KEY = _path(f"{LIB_DIR}/release-key.asc", "The release key's public half.")
PYTHON_DIR = _path(f"{LIB_DIR}/python", "Holds this package, kiln_device/.")
LAUNCHER = _path(f"{LIB_DIR}/launch.py", "`python3 -I launch.py PROGRAM [ARGS]` runs one of the programs below.")
VENV_DIR = _path(f"{LIB_DIR}/venv", "The runtime venv (numpy, onnxruntime): inference and its health check.")
VENV_PYTHON = _path(f"{VENV_DIR}/bin/python", "The runtime venv's python.")
RUNTIME_REQUIREMENTS = _path(f"{LIB_DIR}/requirements.txt", "What the runtime venv was installed from, with "
                                                            "hashes.")
AGENT_VENV_DIR = _path(f"{LIB_DIR}/agent-venv", "The agent's venv (python-tuf, cryptography).")
AGENT_VENV_PYTHON = _path(f"{AGENT_VENV_DIR}/bin/python", "The agent's venv's python: kiln-agent runs here.")
AGENT_REQUIREMENTS = _path(f"{LIB_DIR}/agent-requirements.txt", "What the agent's venv was installed from, with "
                                                                "hashes.")
DEV_AUTHORIZED_KEYS = _path(f"{LIB_DIR}/ssh/authorized_keys", "Development classes only: the per-build test key.")
KARGS_DIR = "/usr/lib/bootc/kargs.d"
KARGS_FILE = _path(f"{KARGS_DIR}/10-kiln.toml", "The class's kernel arguments, bootc's way (release.json "
                                                "`kernelArgs` says the same).")
MODULES_DIR = _path("/usr/lib/modules", "One `<kver>/` with `vmlinuz` (an EFI image, not gzip) and "
                                        "`initramfs.img`.")
MODELS_DIR = _path("/usr/share/kiln/models", "`<name>/<version>/model.onnx`, with the gate's report and golden "
                                             "set.")
AGENT_STATE_DIR = _path(f"{DATA_DIR}/agent", "The agent's journal, blocklist and last result.")
OCI_DIR = _path(f"{DATA_DIR}/oci", "Downloaded images (an OCI layout), resumable.")
WORK_DIR = _path(f"{DATA_DIR}/work", "Scratch space for unpacking an update.")
# The layer store: on the data partition itself, outside the /etc and /var overlays (a factory reset keeps
# it: a slot's root is made of these layers), as the initramfs mounts it.
DATA_MOUNT = _path("/run/kiln/data", "The data partition itself, as the initramfs mounts it.")
LAYERS_DIR = _path(f"{DATA_MOUNT}/layers", "The layer store (kiln_device.layers): a slot's root is made of "
                                           "these; a factory reset keeps them.")
SLOT_LAYER_LIST = _path("/kiln-layers", "In a slot made of layers, the whole of its small erofs: each layer's diff "
                                        "id and fs-verity digest, bottom first, which the initramfs checks.")
LAYER_MOUNTS = _path("/run/kiln/layers", "Where the initramfs mounts each layer (`<n>/`) before it stacks them.")
EMPTY_LOWER = _path("/run/kiln/empty", "With verified boot, the empty bottom of the root's layer stack: the slot's "
                                      "own filesystem, which nothing signed vouches for, is not part of the root.")
RUNNING_LAYERS = _path("/run/kiln/slot-layers", "In a system booted from layers: the booted slot's layer list, as "
                                                "the initramfs read it.")
TRUST_DIR = _path(f"{DATA_DIR}/tuf", "The TUF client's trusted metadata (survives updates).")
OUTBOX_DIR = _path(f"{DATA_DIR}/agent/outbox", "Events waiting for the fleet service.")
IDENTITY_DIR = _path(f"{DATA_DIR}/identity", "The device's own key, made on first boot (or held by the TPM).")
TRUST_ROOT = _path(f"{LIB_DIR}/tuf/root.json", "The image's TUF trust anchor: present, channels are TUF-verified.")
INFERENCE_STATUS = _path(f"{DATA_DIR}/inference/status.json", "kiln-inference: what it serves.")
HEALTH_RESULT = _path(f"{DATA_DIR}/health/inference.json", "kiln-health-inference: this boot's golden check.")
# Degraded modes (kiln_device.degraded): each writer records {"degraded", "degraded_reason", "boot_id"};
# `kiln-agent status` reads them all (this boot's only).
ACCELERATOR_STATE = _path(f"{DATA_DIR}/inference/accelerator.json", "kiln-inference: the providers in use, and "
                                                                    "whether it runs degraded.")
GPU_HEALTH_RESULT = _path(f"{DATA_DIR}/health/gpu.json", "kiln-health-gpu: the gpu-visible check.")
DEGRADED_SOURCES = (ACCELERATOR_STATE, HEALTH_RESULT, GPU_HEALTH_RESULT)
BOOT_ID = "/proc/sys/kernel/random/boot_id"
# CDI at boot (kiln_device.cdi, kiln-nvidia-cdi.service): the spec, or a record of why there is none.
CDI_SPEC = _path("/run/cdi/nvidia.json", "The CDI spec of this boot's NVIDIA devices (kiln-nvidia-cdi).")
CDI_STATUS = _path("/run/kiln/cdi.json", "Why there is no CDI spec, when there is none.")
ESP_MOUNT = _path("/efi", "The EFI system partition: boot entries and each slot's kernel.")
BOOT_DIR = _path("/usr/lib/kiln/boot", "In an image with verified boot (label `dev.kiln.boot`), its top layer: "
                                       "`kiln-a.efi` and `kiln-b.efi` (each slot's signed UKI) and the signed "
                                       "`systemd-boot<arch>.efi`. Not part of the booted root.")
SLOTS = ("a", "b")
# The disk's GPT partition labels (builder.disk.assemble writes them; the agent and the initramfs find slots by them).
ESP_LABEL, DATA_LABEL = "esp", "data"


def slot_label(slot: str) -> str:
    """A slot's root partition label: root-a, root-b."""
    return f"root-{slot}"


SLOT_DEVICES = {s: _path(f"/dev/disk/by-partlabel/{slot_label(s)}", f"Slot {s}'s root partition.")
                for s in SLOTS}

# Programs the launcher runs (name -> module with a main(argv) -> int).
PROGRAMS = {
    "kiln-agent": "kiln_device.agent.cli",
    "kiln-inference": "kiln_device.server",
    "kiln-health-inference": "kiln_device.health",
    "kiln-lint": "kiln_device.lint",
    "kiln-health-gpu": "kiln_device.gpu",
    "kiln-cdi": "kiln_device.cdi",
}


def under(root: Path, device_path: str) -> Path:
    """A device path (/usr/...) inside the tree at `root`."""
    return root / device_path.lstrip("/")


def model_path(name: str, version: str) -> str:
    return f"{MODELS_DIR}/{name}/{version}/model.onnx"


# --- the root filesystem -------------------------------------------------------------------

# spec.disk.compression -> mkfs.erofs -z argument (None: uncompressed).
EROFS_COMPRESSORS: dict[str, str | None] = {"none": None, "lz4": "lz4", "lz4hc": "lz4hc,12", "zstd": "zstd"}

# --- release.json: everything the device needs to know about its image -------------------
# Written by the builder (builder.image.render.finalize_release) through Release; read by the agent, the
# inference service, the health checks and the lints through parse_release. docs/device-contract.md
# is generated from these records (builder.contract_doc).

RELEASE_SCHEMA = 1  # release.json `schemaVersion`: absent in files written before it (the same fields)
BOOT_CONTROLS = ("systemd-boot", "nvbootctrl")
DEFAULT_BOOT_CONTROL = "systemd-boot"
DEFAULT_BOOT_TRIES = 3
DEFAULT_CHANNEL = "stable"
FALLBACK_POLICIES = ("degrade", "fail")  # kiln_device.degraded
SHARING_STRATEGIES = ("none", "time-slicing", "mps")  # kiln_device.server.worker_count
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Runtime:
    name: str = key("name", "The inference runtime (`onnxruntime`, `onnxruntime-gpu`, `onnxruntime-openvino`).")
    version: str = key("version", "Its version, as installed in the runtime venv.")
    execution_providers: tuple[str, ...] = key(
        "executionProviders", "The class's execution providers, in order of preference.", default=(CPU_PROVIDER,))
    device: str | None = key("device", "The OpenVINO device type (`CPU`, `GPU`, `NPU`), where the runtime takes "
                                       "one.", default=None)


@dataclass(frozen=True)
class ReleaseModel:
    name: str = key("name", "The model's name (spec.models[].name).", nonempty=True)
    version: str = key("version", "The model's version.", nonempty=True)
    sha256: str = key("sha256", "The digest of the model file: the device refuses a file that differs.",
                      nonempty=True)
    path: str = key("path", "Where the model file is on the device.", nonempty=True)
    precision: str = key("precision", "What the gate chose (`fp32`, `fp16`, `int8`).", default="?")
    p95_latency_ms: float | None = key("p95LatencyMs", "The model's own latency envelope, where it differs from "
                                                       "the class's.", default=None, positive=True)
    fallback_p95_latency_ms: float | None = key(
        "fallbackP95LatencyMs", "The model's own envelope when the class runs degraded on the CPU.", default=None,
        positive=True)


@dataclass(frozen=True)
class FallbackPolicy:
    policy: str = key("policy", "What the device does without its accelerator: serve on the CPU and report "
                                "itself degraded, or fail its health checks (a trial boot rolls back).",
                      choices=FALLBACK_POLICIES)
    p95_latency_ms: float | None = key("p95LatencyMs", "The envelope the golden check holds a degraded device "
                                                       "to.", default=None, positive=True)


@dataclass(frozen=True)
class Sharing:
    strategy: str = key("strategy", "How inference workers share the accelerator.", choices=SHARING_STRATEGIES)
    replicas: int = key("replicas", "How many inference workers share it.", positive=True)


@dataclass(frozen=True)
class Release:
    """What an image says about itself (/usr/lib/kiln/release.json).

    `compression` and `kernel_args` are None in a release.json written before they were part of it;
    the agent refuses to install such an image rather than guess."""

    cls: str = key("class", "The hardware class the image was built for.", nonempty=True)
    compatible: str = key("compatible", "What a device running it takes updates for (`vendor,class`).",
                          nonempty=True)
    version: str = key("version", "The release's version.", nonempty=True)
    schema_version: int = key("schemaVersion", "This file's format. A reader refuses keys it does not know in a "
                                               "version it knows and ignores them in a newer one.",
                              default=RELEASE_SCHEMA, positive=True)
    revision: str | None = key("revision", "The source revision it was built from.", default=None)
    architecture: str | None = key("architecture", "The CPU architecture (`x86_64`, `arm64`).", default=None)
    accelerator: str = key("accelerator", "The accelerator kind the class declares (`none`, `nvidia-dgpu`, ...).",
                           default="none")
    driver_version: str | None = key("driverVersion", "The accelerator driver version baked in.", default=None)
    runtime: Runtime | None = key("runtime", "The inference runtime.", default=None)
    models: tuple[ReleaseModel, ...] = key("models", "The models the image serves.", default=())
    boot_control: str = key("bootControl", "How the slots are switched.", default=DEFAULT_BOOT_CONTROL,
                            choices=BOOT_CONTROLS)
    boot_tries: int = key("bootTries", "How many boots a trial slot gets before it is rolled back.",
                          default=DEFAULT_BOOT_TRIES, positive=True)
    compression: str | None = key("rootCompression", "How the slot's erofs root is compressed.", default=None,
                                  choices=tuple(EROFS_COMPRESSORS))
    kernel_args: tuple[str, ...] | None = key("kernelArgs", "The class's kernel arguments: what the agent writes "
                                                            "into the boot entry of the slot it installs.",
                                              default=None)
    health_checks: tuple[str, ...] = key("healthChecks", "The checks a trial boot must pass to be blessed.",
                                         default=())
    min_version: str | None = key("minVersion", "The oldest version that may update to this one directly.",
                                  default=None)
    channel: str = key("channel", "The channel the device follows unless agent.json names one.",
                       default=DEFAULT_CHANNEL)
    p95_latency_ms: float | None = key("p95LatencyMs", "The class's latency envelope for the golden check.",
                                       default=None, positive=True)
    development: bool = key("development", "A development image (ssh, the per-build test key): a production "
                                           "device never takes one.", default=False)
    fallback: FallbackPolicy | None = key("fallback", "The degraded-mode policy. Null (older images): degrade "
                                                      "when the runtime lists the CPU provider, else fail.",
                                          default=None)
    sharing: Sharing | None = key("sharing", "How the accelerator is shared.", default=None)

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return self.runtime.execution_providers if self.runtime is not None else (CPU_PROVIDER,)


RELEASE_FIELDS = tuple(f.metadata["json"] for f in fields(Release))


def parse_release(data: Any, where: str = "release.json") -> Release:
    """release.json as a Release; ContractError (a ValueError naming the field) when it is malformed."""
    newer = isinstance(data, Mapping) and isinstance(data.get("schemaVersion"), int) \
        and not isinstance(data.get("schemaVersion"), bool) and data["schemaVersion"] > RELEASE_SCHEMA
    release = load(Release, data, where, ignore_unknown=newer)
    return replace(release, min_version=release.min_version or None, channel=release.channel or DEFAULT_CHANNEL)


def release_json(release: Release) -> dict[str, Any]:
    """What the builder writes as release.json."""
    return dump(release)


# What the agent accepts from an image it has not installed yet (labels, release.json): the
# builder's own rules (builder/core/safe.py), with a length cap. Anything else is refused, never parsed.
MAX_LABEL_LENGTH = 128
VERSION_RE = kv.VERSION_RE  # one grammar (kiln_device.version): MAJOR.MINOR.PATCH[-word.N...]
COMPATIBLE_RE = re.compile(r"[a-z0-9][a-z0-9-]*,[a-z0-9][a-z0-9_.,/-]*")
CLASS_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
KERNEL_ARG_RE = re.compile(r"[A-Za-z0-9_.,:/=+@-]+")
MAX_KERNEL_ARGS = 64
# The agent writes these itself (render_entry); an image must not choose the root or the slot.
RESERVED_KERNEL_ARGS = ("root", "ro", "rw", "rootfstype", "kiln.slot")  # SLOT_KARG


def bad_kernel_args(kargs: Sequence[str]) -> list[str]:
    """Why these kernel arguments may not go into a boot entry (empty: they may)."""
    problems = [] if len(kargs) <= MAX_KERNEL_ARGS else [f"more than {MAX_KERNEL_ARGS} kernel arguments"]
    for arg in kargs:
        if len(arg) > 4 * MAX_LABEL_LENGTH or not KERNEL_ARG_RE.fullmatch(arg):
            problems.append(f"{arg[:40]!r} is not one word of letters, digits and _ . , : / = + @ -")
        elif arg.split("=", 1)[0] in RESERVED_KERNEL_ARGS:
            problems.append(f"{arg!r} is set by the agent for the slot, not by the image")
    return problems


# --- agent.json: the agent's configuration (baked defaults; /etc overrides key by key) -------

IDENTITY_MODES = ("auto", "tpm", "file")


@dataclass(frozen=True)
class AgentTimeouts:
    """Seconds each external step may run before the agent gives up and releases its lock."""

    check: float = key("check", "Reading the channel's manifest.", default=120.0, positive=True)
    fetch: float = key("fetch", "The whole download (skopeo copy).", default=1800.0, positive=True)
    unpack: float = key("unpack", "Unpacking the image (umoci).", default=900.0, positive=True)
    build: float = key("build", "Writing the slot's root (mkfs.erofs).", default=900.0, positive=True)


@dataclass(frozen=True)
class AgentFleet:
    """The optional fleet service the outbox is uploaded to (docs/fleet.md)."""

    url: str = key("url", "`https://HOST:PORT` of the fleet service; empty: none.", default="")
    ca: str = key("ca", "The CA that signed the service's TLS certificate (`kiln disk --etc`).",
                  default="/etc/kiln/fleet-ca.pem")
    token: str = key("token", "The enrollment token (`kiln disk --etc`); deleted once the service has answered "
                              "the enrollment, so a device in the field carries none.",
                     default="/etc/kiln/enroll.token")
    serial: str | None = key("serial", "The device's serial, which the fleet's allow-list may name (`kiln fleet "
                                       "allow`); unset: the firmware's (DMI product serial, or the device tree's).",
                             default=None)
    outbox_max: int = key("outboxMax", "How many events the outbox keeps (the oldest go first, counted).",
                          default=2000, positive=True)
    batch: int = key("batch", "How many events go in one upload.", default=200, positive=True)
    identity: str = key("identity", "Where the device key is made on first use: the TPM where there is one, "
                                    "else a file (`auto`), or only one of them.", default="auto",
                        choices=IDENTITY_MODES)


@dataclass(frozen=True)
class AgentFile:
    """The agent's configuration: /usr/lib/kiln/agent.json (baked by the builder from spec.rollout), then
    /etc/kiln/agent.json and `--config`, each over the last key by key (`timeouts` and `fleet` too)."""

    registry: str = key("registry", "The registry updates come from (`host:port`).", default="")
    repository: str = key("repository", "The repository in it; empty: `kiln/<class>`.", default="")
    channel: str = key("channel", "The channel to follow; empty: release.json's.", default="")
    lookaside: str = key("lookaside", "The URL signatures and the TUF channel are served from.", default="")
    insecure: bool = key("insecure", "Plain HTTP to the registry (development only).", default=False)
    policy: str = key("policy", "The containers signature policy.", default=POLICY_JSON)
    release: str = key("release", "The running image's release.json.", default=RELEASE_JSON)
    state_dir: str = key("stateDir", "The agent's state.", default=AGENT_STATE_DIR)
    oci_dir: str = key("ociDir", "Downloaded images.", default=OCI_DIR)
    work_dir: str = key("workDir", "Scratch space.", default=WORK_DIR)
    layers_dir: str = key("layersDir", "The layer store.", default=LAYERS_DIR)
    trust_root: str = key("trustRoot", "The image's TUF root.", default=TRUST_ROOT)
    trust_dir: str = key("trustDir", "The TUF client's metadata.", default=TRUST_DIR)
    esp: str = key("esp", "Where the ESP is mounted.", default=ESP_MOUNT)
    slots: dict[str, str] = key("slots", "Each slot's root partition.", default=dict(SLOT_DEVICES))
    partuuids: dict[str, str] = key("partuuids", "Each slot's partition UUID, where the boot entry cannot be read "
                                                 "for it.", default={})
    cmdline: str = key("cmdline", "The kernel command line (which slot booted).", default="/proc/cmdline")
    efivars: str = key("efivars", "The EFI variables (systemd-boot's boot counting).",
                       default="/sys/firmware/efi/efivars")
    boot_id: str = key("bootId", "This boot's id.", default=BOOT_ID)
    reboot_command: tuple[str, ...] = key("rebootCommand", "How the agent reboots into a trial slot.",
                                          default=("systemctl", "reboot"))
    timeouts: AgentTimeouts = key("timeouts", "Seconds each step may run.", default=AgentTimeouts())
    fleet: AgentFleet = key("fleet", "The fleet service.", default=AgentFleet())
    window: str = key("window", "Maintenance window in UTC, `HH:MM-HH:MM` (may wrap past midnight); empty: any "
                                "time. Outside it `update` only downloads.", default="")


AGENT_DEFAULTS: dict[str, Any] = dump(AgentFile())
AGENT_CONFIG_KEYS = tuple(AGENT_DEFAULTS)
AGENT_MERGED = ("timeouts", "fleet")  # objects an override merges into key by key


def merge_agent_files(*files: Mapping[str, Any]) -> dict[str, Any]:
    """agent.json files, each over the last (and all over the defaults), key by key."""
    merged = dict(AGENT_DEFAULTS)
    for data in files:
        for name, value in data.items():
            both = name in AGENT_MERGED and isinstance(value, dict) and isinstance(merged.get(name), dict)
            merged[name] = {**merged[name], **value} if both else value
    return merged


MAX_OUTBOX = 1_000_000
MAX_BATCH = 1000  # what the fleet service takes in one report (kiln_device.fleet.MAX_EVENTS)
WINDOW_RE = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")


def parse_agent_file(data: Any, where: str) -> AgentFile:
    """One agent.json (all of it, or an override's few keys) over the defaults, or all of them merged;
    ContractError naming the field, for its types and for the rules below."""
    if not isinstance(data, Mapping):
        raise ContractError(where, "", "expected a JSON object of agent settings")
    agent = load(AgentFile, merge_agent_files(data), where)
    fleet = agent.fleet
    if fleet.url and not fleet.url.startswith("https://"):
        raise ContractError(where, "fleet.url", f"{fleet.url!r}: the fleet service is reached over TLS "
                                                "(https://HOST:PORT)")
    for name, value, most in (("outboxMax", fleet.outbox_max, MAX_OUTBOX), ("batch", fleet.batch, MAX_BATCH)):
        if value > most:
            raise ContractError(where, f"fleet.{name}", f"expected a whole number from 1 to {most}, got {value}")
    missing = [slot for slot in SLOTS if slot not in agent.slots]
    if missing:
        raise ContractError(where, "slots", f"names no partition for slot {', '.join(missing)}")
    try:
        window_minutes(agent.window)
    except ValueError as exc:
        raise ContractError(where, "window", str(exc)) from None
    return agent


def window_minutes(text: str) -> tuple[int, int] | None:
    """agent.json `window`, "HH:MM-HH:MM" in UTC (may wrap past midnight), as minutes after 00:00 UTC
    [start, end); None for "" (any time). ValueError when it is not one."""
    if not text:
        return None
    m = WINDOW_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r}: expected HH:MM-HH:MM (UTC), for example 02:00-04:30")
    start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
    if start == end:
        raise ValueError(f"{text!r}: an empty window; leave it out for any time")
    return start, end


def default_repository(cls: str) -> str:
    return f"kiln/{cls}"


# --- the agent's exit codes --------------------------------------------------------------

OK, INTERNAL, UP_TO_DATE, INCOMPATIBLE, NOT_NEWER, BLOCKLISTED = 0, 1, 2, 3, 4, 5
SIGNATURE, UNREACHABLE, NO_SPACE, WRITE_FAILED, LOCKED, CONFIG, USAGE = 6, 7, 8, 9, 10, 11, 64
BAD_IMAGE = 12  # the release is malformed (labels, release.json, kernel): refused, its digest blocklisted
STALE = 13  # the channel's TUF metadata expired: nothing is installed until fresh metadata verifies
WAITING = 14  # the rollout has not reached this device's wave or is halted, the window is closed, or this is a trial
AGENT_EXIT_CODES = {
    "ok": OK, "internal": INTERNAL, "up-to-date": UP_TO_DATE, "incompatible": INCOMPATIBLE,
    "not-newer": NOT_NEWER, "blocklisted": BLOCKLISTED, "signature": SIGNATURE, "unreachable": UNREACHABLE,
    "no-space": NO_SPACE, "write-failed": WRITE_FAILED, "locked": LOCKED, "config": CONFIG, "usage": USAGE,
    "bad-image": BAD_IMAGE, "stale": STALE, "waiting": WAITING,
}

# --- boot: slots, entries, the ESP -----------------------------------------------------------

SLOT_KARG = "kiln.slot"
# In a UKI's signed command line: the sha256 of the slot's /kiln-layers, which the initramfs checks.
LAYERS_KARG = "kiln.layers"
ENTRY_RE = re.compile(r"^kiln-(?P<version>.+)-(?P<slot>[ab])(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?"
                      r"\.(?P<kind>conf|efi)$")
UKI_DIR = "EFI/Linux"  # on the ESP: type #2 entries (UKIs), counted by file name like type #1 entries
ENTRY_PATTERN = "kiln-*"  # loader.conf's default: never one pinned entry


def other_slot(slot: str) -> str:
    return "b" if slot == "a" else "a"


def entry_text(version: str) -> str:
    """A version as a boot entry carries it (file name, `version` line): a Kiln version with `~` before its
    pre-release, which systemd-boot sorts below the release; a version of an older grammar as it is."""
    return kv.Version(version).entry if kv.is_valid(version) else version


def entry_name(version: str, slot: str, tries: int | None = None, *, uki: bool = False) -> str:
    """`kiln-<version>-<slot>.conf` (`.efi`: a UKI in EFI/Linux); with tries, systemd's boot counter `+N`
    (a trial entry)."""
    return f"kiln-{entry_text(version)}-{slot}" + (f"+{tries}" if tries is not None else "") + \
        (".efi" if uki else ".conf")


def uki_image_name(slot: str) -> str:
    """A slot's UKI as the image carries it, in BOOT_DIR."""
    return f"kiln-{slot}.efi"


def layers_digest(text: str | bytes) -> str:
    """What LAYERS_KARG carries: `sha256:<hex>` of a slot's /kiln-layers."""
    return "sha256:" + hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def render_uki_cmdline(*, slot: str, layers: str, kargs: Sequence[str], rootfstype: str = "erofs") -> str:
    """A slot's UKI command line: the slot's root by partition label (the same UKI boots on every disk of
    the class), the layer list digest that binds it, the class's arguments."""
    return " ".join([f"root=PARTLABEL={slot_label(slot)}", "ro", f"rootfstype={rootfstype}", f"{SLOT_KARG}={slot}",
                     f"{LAYERS_KARG}={layers}", *kargs])


def read_cmdline_value(cmdline: str, key: str) -> str | None:
    for word in cmdline.split():
        if word.startswith(f"{key}="):
            return word.split("=", 1)[1]
    return None


@dataclass(frozen=True)
class Entry:
    name: str
    version: str
    slot: str
    tries_left: int | None  # None: blessed (or never counted)
    tries_done: int | None
    uki: bool = False  # a UKI in EFI/Linux, not a .conf in loader/entries

    @property
    def blessed(self) -> bool:
        return self.tries_left is None

    @property
    def exhausted(self) -> bool:
        return self.tries_left == 0


def parse_entry_name(name: str) -> Entry | None:
    m = ENTRY_RE.match(name)
    if not m:
        return None
    left, done = m.group("left"), m.group("done")
    version = kv.Version.from_entry(m.group("version"))
    return Entry(name, str(version) if version else m.group("version"), m.group("slot"),
                 int(left) if left is not None else None, int(done) if done is not None else None,
                 m.group("kind") == "efi")


def esp_kernel_dir(slot: str) -> str:
    """Where a slot's kernel and initramfs live on the ESP (vmlinuz, initramfs.img)."""
    return f"/kiln/{slot}"


def render_entry(*, cls: str, version: str, slot: str, partuuid: str, kargs: Sequence[str],
                 rootfstype: str = "erofs") -> str:
    """A Boot Loader Specification type #1 entry for one slot (`kiln disk` and the agent)."""
    options = [f"root=PARTUUID={partuuid}", "ro", f"rootfstype={rootfstype}", f"{SLOT_KARG}={slot}", *kargs]
    kdir = esp_kernel_dir(slot)
    return (f"title Kiln {cls} {version} (slot {slot})\nversion {entry_text(version)}\nsort-key kiln\n"
            f"linux {kdir}/vmlinuz\ninitrd {kdir}/initramfs.img\noptions {' '.join(options)}\n")


def read_cmdline_slot(cmdline: str) -> str | None:
    for word in cmdline.split():
        if word.startswith(f"{SLOT_KARG}="):
            slot = word.split("=", 1)[1]
            return slot if slot in SLOTS else None
    return None


# --- OCI ------------------------------------------------------------------------------------

LABELS: dict[str, str] = {}  # label -> what the agent reads it for (docs/device-contract.md)


def _label(name: str, doc: str) -> str:
    LABELS[name] = doc
    return name


LABEL_VERSION = _label("org.opencontainers.image.version", "The release's version: checked before anything is "
                                                           "downloaded, and against release.json after.")
LABEL_PREFIX = "dev.kiln."
LABEL_CLASS = _label("dev.kiln.class", "The hardware class.")
LABEL_COMPATIBLE = _label("dev.kiln.compatible", "Which devices may install it.")
LABEL_MIN_VERSION = _label("dev.kiln.min-version", "The oldest version that may update to it directly.")
LABEL_ARCHITECTURE = _label("dev.kiln.architecture", "The CPU architecture.")
LABEL_ACCELERATOR = _label("dev.kiln.accelerator", "The accelerator kind.")
LABEL_RUNTIME = _label("dev.kiln.runtime", "The inference runtime and its version.")
LABEL_ROOT_LAYERS = _label("dev.kiln.root-layers", "Present on an image whose initramfs boots a slot made of "
                                                   "layers: how each layer's erofs is compressed.")
LABEL_BOOT = _label("dev.kiln.boot", "`uki` on an image with verified boot: its top layer is the boot layer "
                                     "(BOOT_DIR), not part of the root; each slot boots its signed UKI.")
LABEL_BOOT_LAYERS = _label("dev.kiln.boot.layers", "With verified boot: the digest of the layer list (the root's "
                                                   "layers, boot layer left out) that the UKIs' command lines bind.")
BOOT_UKI = "uki"
LABEL_DEVELOPMENT = _label("dev.kiln.development", "`true` or `false`: a production device takes no development "
                                                   "image.")
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"


def model_label(model: str, key: str) -> str:
    """dev.kiln.model.<name>.<digest|precision|version>."""
    return f"{LABEL_PREFIX}model.{model}.{key}"


def oci_ref_name(version: str) -> str:
    """A version as an image name in an OCI layout (the agent's ociDir, `kiln disk`'s seed)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", version)
