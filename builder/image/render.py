"""Render a class into a build context: Containerfile + overlays + model + release.json.

`finalize_plan` derives everything once from the frozen spec; `render_containerfile`
and `make_context` only read the plan. Rendering is deterministic: the same
spec, version, revision and model files give byte-identical output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from builder.base.mirrors import BaseMirror, finalize_base_mirror
from builder.base.pins import want_pinned_driver
from builder.core import paths
from builder.core.files import sha256_file
from builder.core.versions import DEFAULT_EPOCH
from builder.model.artifact import ModelArtifact
from builder.spec import names
from builder.spec.contents import finalize_content_labels
from builder.spec.schema import AcceleratorKind, BaseSource, Fallback, Family, HardwareClass, HealthCheck, ModuleBuild
from kiln_device import contract

TEMPLATES = Path(__file__).with_name("templates")
DEFAULT_VERSION = "0.0.0-dev"
KARGS_FILE = contract.KARGS_FILE.lstrip("/")
# The device package (kiln_device), copied into every image under contract.PYTHON_DIR.
DEVICE_PACKAGE = Path(contract.__file__).resolve().parent

# What every image of an apt family needs on top of its base to boot as Kiln expects.
APT_ESSENTIALS = ("systemd-sysv", "udev", "dbus", "kmod", "initramfs-tools", "python3", "systemd-boot",
                  # the device agent: pull + verify (skopeo, gnupg), unpack (umoci), write a slot (erofs)
                  "skopeo", "gnupg", "umoci", "erofs-utils",
                  # layered slots: each layer's fs-verity digest, checked by the agent and the initramfs
                  "fsverity",
                  # the agent verifies the registry's TLS certificate against the system's CA bundle
                  "ca-certificates",
                  # the device key is made in the TPM where there is one (kiln_device.agent.identity)
                  "tpm2-tools")
# Debian: skopeo's containers-common needs a container-network-stack; apt's first choice is
# containernetworking-plugins (45 MB of CNI binaries, and iptables), netavark provides it in 4 MB. A
# device runs no containers: either is dead weight, this one is a tenth of it (issue 18: image size).
DEBIAN_ESSENTIALS = ("netavark",)
SSHD_DROP_IN = "etc/ssh/sshd_config.d/40-kiln.conf"
# What each layer of an image is, slowest-changing first: the base image's own layers, then one
# group per layer-creating instruction of the templates (each marked there with `layer("group")`).
# The OS stage's groups: with plan.rechunk, build.json records its layers as the rechunked ones.
OS_STAGE_GROUPS = ("repositories", "os", "packages")
LAYER_GROUPS = ("base", "repositories", "os", "packages", "drivers", "kernel", "runtime", "agent", "model", "release",
                "lint")
# What the image contains, beyond the contract's labels (informational: no device decides on them).
LABEL_BASE_MIRROR = "dev.kiln.base.mirror"
LABEL_BASE_SNAPSHOT = "dev.kiln.base.snapshot"  # the snapshot, or "unpinned" (a fallback mirror)
PYTHON = {Family.debian: "python3", Family.l4t: "python3", Family.fedora_bootc: "python3",
          Family.centos_bootc: "python3.11"}


@dataclass(frozen=True)
class RenderPlan:
    hc: HardwareClass
    source: str
    version: str
    revision: str
    base_ref: str
    base_mirror: BaseMirror | None  # a bootstrap base: the mirror it comes from (None: a registry base)
    python: str
    os_packages: tuple[str, ...]
    # apt: os_packages split in two layers, so that a change to the class's own list downloads
    # (and writes, on a device) only the small layer of the class's packages (issue 18).
    system_packages: tuple[str, ...]
    class_packages: tuple[str, ...]
    driver_packages: tuple[str, ...]
    driver_build_packages: tuple[str, ...]  # the modules stage's (empty: no such stage)
    models: tuple[ModelArtifact, ...]
    labels: tuple[tuple[str, str], ...] = field(default=())
    release: contract.Release | None = None
    ssh_public_key: str | None = None  # development classes: the per-build test key (see build.py)
    epoch: int = DEFAULT_EPOCH  # SOURCE_DATE_EPOCH for tools run in the build (mkinitramfs)
    # The release key and the containers policy requiring it (builder.keys.device_files.finalize_device_files):
    # path under / -> bytes. Empty: the image can verify no update (`kiln render` without a key).
    device_files: tuple[tuple[str, bytes], ...] = ()
    agent_config: dict[str, object] = field(default_factory=dict)

    @property
    def rechunk(self) -> bool:
        """The OS stage is built apart and rechunked by Debian package (builder/image/rechunk.py): apt only."""
        return self.hc.spec.base.family.package_manager == "apt"


def model_envelope(spec: Any, name: str) -> dict[str, float | None]:
    """release.json's per-model envelope (none: the model has the class's)."""
    m = next((m for m in spec.models if m.name == name), None)
    if m is None or m.envelope is None:
        return {}
    return {"p95_latency_ms": m.envelope.p95_latency_ms,
            "fallback_p95_latency_ms": m.envelope.fallback_p95_latency_ms}


def finalize_source_models(hc: HardwareClass) -> tuple[ModelArtifact, ...]:
    """The spec's source models as-is (FP32): what is baked before optimization."""
    from builder.model.fetch import ensure_sources

    root = paths.project_root()
    ensure_sources(hc)
    return tuple(
        ModelArtifact(name=m.name, version=m.version, precision="fp32", path=root / m.source,
                      sha256=sha256_file(root / m.source))
        for m in hc.spec.models
    )


def finalize_os_packages(hc: HardwareClass) -> tuple[str, ...]:
    spec = hc.spec
    pkgs = list(spec.packages)
    if spec.kernel.package:
        pkgs.append(spec.kernel.package)
    if spec.base.family.package_manager == "apt":
        pkgs.extend(APT_ESSENTIALS)
    if spec.base.family is Family.debian:
        pkgs.extend(DEBIAN_ESSENTIALS)
    if spec.access.ssh:
        pkgs.append("openssh-server")
    return tuple(sorted(set(pkgs)))


def finalize_package_layers(hc: HardwareClass) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(system, class): what every image of the family needs (the kernel, Kiln's essentials, ssh
    for access), and the class's own packages that are not among them."""
    every = finalize_os_packages(hc)
    if hc.spec.base.family.package_manager != "apt":
        return every, ()
    own = set(hc.spec.packages) - set(APT_ESSENTIALS) - set(DEBIAN_ESSENTIALS) - {hc.spec.kernel.package}
    if hc.spec.access.ssh:
        own.discard("openssh-server")
    return tuple(p for p in every if p not in own), tuple(sorted(own))


def finalize_driver_packages(hc: HardwareClass) -> tuple[str, ...]:
    """The image's driver packages (pinned where want_pinned_driver), then the container toolkit
    pinned to its version when the class installs one (toolkit.source: repository)."""
    acc = hc.spec.accelerator
    pkgs = list(acc.driver.packages) if acc.driver else []
    if acc.driver is not None and want_pinned_driver(hc):
        pkgs = [f"{p}={acc.driver.version}" for p in pkgs]
    if acc.toolkit is not None and acc.toolkit.installed:
        sep = "=" if hc.spec.base.family.package_manager == "apt" else "-"
        pkgs.append(f"{acc.toolkit.name}{sep}{acc.toolkit.version}" + ("-1" if sep == "=" else ""))
    return tuple(pkgs)


def finalize_driver_build_packages(hc: HardwareClass) -> tuple[str, ...]:
    """What the throwaway modules stage installs (kernelModules: image): driver.buildPackages, pinned;
    the template adds linux-headers-<the image's kernel>. Empty: no modules stage."""
    driver = hc.spec.accelerator.driver
    if driver is None or driver.kernel_modules is not ModuleBuild.image or not driver.build_packages:
        return ()
    if want_pinned_driver(hc):
        return tuple(f"{p}={driver.version}" for p in driver.build_packages)
    return tuple(driver.build_packages)


def finalize_release(hc: HardwareClass, version: str, revision: str,
                     models: tuple[ModelArtifact, ...]) -> contract.Release:
    """What the image says about itself: release.json, written through the device's own record."""
    spec = hc.spec
    return contract.Release(
        cls=hc.name,
        compatible=spec.compatible,
        version=version,
        revision=revision,
        architecture=spec.architecture.value,
        accelerator=spec.accelerator.kind.value,
        driver_version=spec.accelerator.driver.version if spec.accelerator.driver else None,
        runtime=contract.Runtime(name=spec.runtime.name.value, version=spec.runtime.version,
                                 execution_providers=tuple(spec.runtime.execution_providers),
                                 device=spec.runtime.device),
        models=tuple(contract.ReleaseModel(name=m.name, version=m.version, precision=m.precision, sha256=m.sha256,
                                           path=f"{m.image_dir}/model.onnx", **model_envelope(spec, m.name))
                     for m in models),
        boot_control=spec.boot_control.value,
        boot_tries=spec.rollout.boot_tries,
        compression=spec.disk.compression,
        kernel_args=tuple(spec.kernel.args),
        health_checks=tuple(c.value for c in spec.rollout.health_checks),
        min_version=spec.rollout.min_version,
        channel=spec.rollout.channel,
        p95_latency_ms=spec.envelope.p95_latency_ms,
        development=spec.development,
        # What the device does without its accelerator (kiln_device.degraded), and how many inference
        # workers share it (kiln_device.server.worker_count).
        fallback=finalize_fallback(spec.accelerator.fallback),
        sharing=contract.Sharing(strategy=spec.accelerator.sharing.strategy.value,
                                 replicas=spec.accelerator.sharing.replicas),
    )


def finalize_fallback(fallback: Fallback | None) -> contract.FallbackPolicy | None:
    if fallback is None:
        return None
    return contract.FallbackPolicy(policy=fallback.policy.value, p95_latency_ms=fallback.p95_latency_ms)


def finalize_extras(extras: tuple[str, ...] | list[str]) -> str:
    """`[cuda,cudnn]` (pip's extras syntax), or empty."""
    return f"[{','.join(extras)}]" if extras else ""


def finalize_labels(hc: HardwareClass, models: tuple[ModelArtifact, ...],
                    base: BaseMirror | None = None) -> tuple[tuple[str, str], ...]:
    spec, rt = hc.spec, hc.spec.runtime
    # The spec's own labels first: Kiln's (which devices and the agent trust) always win.
    labels = {**hc.metadata.labels}
    labels |= {
        "org.opencontainers.image.title": hc.name,
        "org.opencontainers.image.description": hc.metadata.description or hc.name,
        contract.LABEL_VERSION: "${VERSION}",
        "org.opencontainers.image.revision": "${REVISION}",
        "org.opencontainers.image.created": "${CREATED}",
        "org.opencontainers.image.source": f"images/{hc.file_name}",
        "org.opencontainers.image.vendor": hc.metadata.vendor,
        contract.LABEL_CLASS: hc.name,
        contract.LABEL_COMPATIBLE: spec.compatible,
        contract.LABEL_ARCHITECTURE: spec.architecture.value,
        contract.LABEL_ACCELERATOR: spec.accelerator.kind.value,
        contract.LABEL_RUNTIME: f"{rt.name.value}{finalize_extras(rt.extras)}=={rt.version}",
        contract.LABEL_MIN_VERSION: spec.rollout.min_version or "",
        contract.LABEL_DEVELOPMENT: "true" if spec.development else "false",
    }
    for m in models:
        labels[contract.model_label(m.name, "digest")] = f"sha256:{m.sha256}"
        labels[contract.model_label(m.name, "precision")] = m.precision
        labels[contract.model_label(m.name, "version")] = m.version
    if spec.base.family.package_manager == "apt":  # its initramfs (Kiln's hook) boots a slot made of layers
        labels[contract.LABEL_ROOT_LAYERS] = spec.disk.compression
    labels |= finalize_content_labels(hc)  # driver, kernel modules, toolkit, CDI, CUDA (builder.spec.contents)
    if base is not None:  # a bootstrap base: which mirror it actually came from
        labels[LABEL_BASE_MIRROR] = base.url
        labels[LABEL_BASE_SNAPSHOT] = base.snapshot or "unpinned"
    return tuple(sorted(labels.items()))


def finalize_plan(hc: HardwareClass, *, source: str, version: str = DEFAULT_VERSION,
                  revision: str = "unknown",
                  models: tuple[ModelArtifact, ...] | None = None,
                  ssh_public_key: str | None = None, epoch: int = DEFAULT_EPOCH,
                  device_files: dict[str, bytes] | None = None, base: BaseMirror | None = None) -> RenderPlan:
    """`base`: where the bootstrap base comes from (builder.base.mirrors.finalize_base_mirror; default: the
    spec's first choice, not probed). The build passes the one it bootstrapped."""
    models = models if models is not None else finalize_source_models(hc)
    if base is None and hc.spec.base.source is BaseSource.bootstrap:
        base = finalize_base_mirror(hc, probe=False)
    if ssh_public_key is not None and not hc.spec.development:
        raise ValueError(f"{hc.name} is a production class: it never gets a test SSH key")
    return RenderPlan(
        hc=hc, source=source, version=version, revision=revision,
        base_ref=base.ref if base else names.base_ref(hc),
        base_mirror=base,
        python=PYTHON[hc.spec.base.family],
        os_packages=finalize_os_packages(hc),
        system_packages=finalize_package_layers(hc)[0], class_packages=finalize_package_layers(hc)[1],
        driver_packages=finalize_driver_packages(hc),
        driver_build_packages=finalize_driver_build_packages(hc),
        models=models,
        labels=finalize_labels(hc, models, base),
        release=finalize_release(hc, version, revision, models),
        ssh_public_key=ssh_public_key,
        epoch=epoch,
        device_files=tuple(sorted((device_files or {}).items())),
        agent_config=finalize_agent_config(hc),
    )


def finalize_agent_config(hc: HardwareClass) -> dict[str, object]:
    """/usr/lib/kiln/agent.json: where the device agent looks for updates (from spec.rollout)."""
    r = hc.spec.rollout
    config: dict[str, object] = {"repository": contract.default_repository(hc.name), "channel": r.channel}
    if r.registry:
        config.update(registry=r.registry, lookaside=r.lookaside or "", insecure=r.insecure_registry)
    if r.window:
        config["window"] = r.window
    contract.parse_agent_file(config, contract.AGENT_JSON)  # written through the agent's own record
    return config


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # noqa: S701 - Containerfiles, not HTML; values are validated in builder.core.safe
    )


@dataclass(frozen=True)
class RenderedContainerfile:
    """The Containerfile's text and the group of each layer it creates (RUN, COPY, ADD), in order."""

    text: str
    layer_groups: tuple[str, ...]


def finalize_containerfile(plan: RenderPlan) -> RenderedContainerfile:
    """Render the class's template; each layer-creating instruction is preceded by `layer("group")`."""
    groups: list[str] = []

    def layer(group: str) -> str:
        if group not in LAYER_GROUPS:
            raise ValueError(f"layer group {group!r} is not one of {', '.join(LAYER_GROUPS)}")
        groups.append(group)
        return ""

    template = _environment().get_template(plan.hc.spec.base.family.template)
    text = template.render(plan=plan, hc=plan.hc, spec=plan.hc.spec, source=plan.source, layer=layer,
                           c=contract)  # paths on the device come from the contract
    text = "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"
    return RenderedContainerfile(re.sub(r"\n{3,}", "\n\n", text), tuple(groups))


def render_containerfile(plan: RenderPlan) -> str:
    return finalize_containerfile(plan).text


# --- the build context -------------------------------------------------------


def make_context(plan: RenderPlan, outdir: Path, wheelhouse: Path | None = None,
                 agent_wheelhouse: Path | None = None) -> Path:
    """Write DIR/Containerfile and everything it COPYs. Replaces DIR atomically.

    `wheelhouse` (builder.base.wheels.make_wheelhouse) fills runtime/wheels/ and pins
    runtime/requirements.txt by hash; without it the requirements are plain
    pins and the context cannot be built offline (the unit tests' case). `agent_wheelhouse`
    does the same for agent/ (the agent venv: python-tuf).
    """
    outdir = outdir.resolve()
    tmp = outdir.with_name(outdir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "Containerfile").write_text(render_containerfile(plan))
    make_overlay_tree(plan, tmp / "overlays")
    make_class_tree(plan, tmp / "class")
    make_model_tree(plan, tmp / "models")
    make_runtime_files(plan, tmp / "runtime", wheelhouse)
    make_runtime_files(plan, tmp / "agent", agent_wheelhouse, agent=True)
    make_repo_files(plan, tmp / "repos")
    if plan.hc.spec.base.family.package_manager == "apt":
        _copy_tree(paths.overlays_dir() / "initramfs", tmp / "initramfs")
    assert plan.release is not None
    _write_json(tmp / "release" / "release.json", contract.release_json(plan.release))
    _write_json(tmp / "release" / "class.json", plan.hc.model_dump(mode="json", by_alias=True))
    _normalize_mtimes(tmp)
    shutil.rmtree(outdir, ignore_errors=True)
    tmp.rename(outdir)
    return outdir


def overlay_sources(plan: RenderPlan) -> list[Path]:
    """Overlay trees for this class, in copy order (later wins)."""
    root = paths.overlays_dir()
    names = ["common"]
    kind = plan.hc.spec.accelerator.kind
    if kind is AcceleratorKind.nvidia_dgpu:
        names.append("nvidia")
    return [root / n for n in names if (root / n).is_dir()]


def make_overlay_tree(plan: RenderPlan, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src in overlay_sources(plan):
        _copy_tree(src, dest)
    make_device_package(contract.under(dest, contract.PYTHON_DIR) / "kiln_device")


def make_device_package(dest: Path) -> None:
    """The kiln_device package's sources (no __pycache__): what /usr/lib/kiln/launch.py runs."""
    shutil.copytree(DEVICE_PACKAGE, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def make_class_tree(plan: RenderPlan, dest: Path) -> None:
    spec = plan.hc.spec
    kargs = dest / KARGS_FILE
    kargs.parent.mkdir(parents=True)
    kargs.write_text("# Kernel arguments of class {} (from its spec)\nkargs = [{}]\n".format(
        plan.hc.name, ", ".join(json.dumps(a) for a in spec.kernel.args)))
    _write_json(contract.under(dest, contract.AGENT_JSON), plan.agent_config)
    for rel, data in plan.device_files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    if spec.access.ssh:
        # Never the distribution's defaults: keys only, no passwords, nothing forwarded.
        conf = dest / SSHD_DROP_IN
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("# Kiln: sshd on a Kiln image takes keys only (spec.access.ssh; development classes only)\n"
                        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitEmptyPasswords no\n"
                        "PermitRootLogin prohibit-password\nX11Forwarding no\nAllowAgentForwarding no\n"
                        "MaxAuthTries 3\nLoginGraceTime 30\n"
                        "# the one host key kiln-ssh-keygen.service makes at first boot\n"
                        "HostKey /etc/ssh/ssh_host_ed25519_key\n")
    if plan.ssh_public_key:
        # Development only (finalize_plan refuses it otherwise): root logs in with the
        # per-build key; the image stays free of passwords and of any fixed key.
        keys = contract.under(dest, contract.DEV_AUTHORIZED_KEYS)
        keys.parent.mkdir(parents=True)
        keys.write_text(plan.ssh_public_key.strip() + "\n")
        conf = dest / "etc/ssh/sshd_config.d/50-kiln-dev.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text("# Kiln development class: the per-build test key (build/<class>/ssh/), never shipped\n"
                        f"AuthorizedKeysFile .ssh/authorized_keys {contract.DEV_AUTHORIZED_KEYS}\n"
                        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n")
    # gpu-visible is checked only where the class asks for it (kiln-health-gpu.service, common overlay).
    gpu = HealthCheck.gpu_visible in spec.rollout.health_checks
    preset = dest / "usr/lib/systemd/system-preset/70-kiln-class.preset"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(f"# Class {plan.hc.name}: health checks from spec.rollout.healthChecks (before 80-kiln.preset)\n"
                      f"{'enable' if gpu else 'disable'} kiln-health-gpu.service\n")


def make_model_tree(plan: RenderPlan, dest: Path) -> None:
    dest.mkdir(parents=True)
    for m in plan.models:
        d = dest / m.name / m.version
        d.mkdir(parents=True)
        shutil.copyfile(m.path, d / "model.onnx")
        for extra in m.extra_files:
            shutil.copyfile(extra, d / extra.name)


def make_runtime_files(plan: RenderPlan, dest: Path, wheelhouse: Path | None, *, agent: bool = False) -> None:
    """DEST/wheels and DEST/requirements.txt for the runtime venv (or, with `agent`, the agent venv)."""
    from builder.base import wheels

    (dest / "wheels").mkdir(parents=True)
    if wheelhouse is None:
        target = wheels.finalize_agent_target(plan.hc) if agent else wheels.finalize_target(plan.hc)
        (dest / "requirements.txt").write_text("\n".join(target.requirements) + "\n")
        return
    for wheel in wheels.wheel_files(wheelhouse):
        link_or_copy(wheel, dest / "wheels" / wheel.name)
    (dest / "requirements.txt").write_text(wheels.render_locked_requirements(wheelhouse))


def link_or_copy(src: Path, dest: Path) -> None:
    """A hard link to a wheel of the (immutable) wheelhouse, a copy across filesystems: the CUDA
    wheels alone are 2 GB, and a copy per build context filled the disk by the version."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def make_repo_files(plan: RenderPlan, dest: Path) -> None:
    dest.mkdir(parents=True)
    for repo in plan.hc.spec.repositories:
        if plan.hc.spec.base.family.package_manager == "apt":
            key = f"/usr/share/keyrings/kiln-{repo.name}.asc"
            suite = repo.suite or "/"
            comps = " ".join(repo.components)
            line = f"deb [signed-by={key}] {repo.url} {suite} {comps}".rstrip()
            (dest / f"kiln-{repo.name}.list").write_text(line + "\n")
        else:
            (dest / f"kiln-{repo.name}.repo").write_text(
                f"[kiln-{repo.name}]\nname={repo.name}\nbaseurl={repo.url}\n"
                f"enabled=1\ngpgcheck=1\ngpgkey={repo.key}\n")


def _copy_tree(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True, symlinks=True)


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _normalize_mtimes(root: Path, epoch: int = 0) -> None:
    """Same inputs, same context bytes and times (COPY keeps mtimes)."""
    import os

    for p in sorted(root.rglob("*"), reverse=True):
        os.utime(p, (epoch, epoch), follow_symlinks=False)
    os.utime(root, (epoch, epoch))
