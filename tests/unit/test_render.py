"""Rendering: golden Containerfiles, determinism, hadolint, layer order."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from builder.image.render import (
    LAYER_GROUPS,
    finalize_containerfile,
    finalize_plan,
    make_context,
    render_containerfile,
)
from builder.spec.loader import load_class
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests/golden"
CLASSES = ["arm64-vision", "factory-gateway-gpu", "intel-lowpower-detector", "jetson-vision-standard",
           "jetson-vision-standard-stand-in",
           "medical-cart-cpu", "qemu-x86_64"]


def plan(name: str, version: str = "1.2.3"):  # type: ignore[no-untyped-def]
    return finalize_plan(load_class(name, ROOT / "images"), source=f"images/{name}.yaml",
                         version=version, revision="0123abc")


@pytest.mark.parametrize("name", CLASSES)
def test_golden_containerfile(name: str, regen_golden: bool) -> None:
    text = render_containerfile(plan(name))
    golden = GOLDEN / f"{name}.Containerfile"
    if regen_golden:
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), "run pytest --regen-golden to create it"
    assert text == golden.read_text(), f"{golden} is stale: review the diff, then pytest --regen-golden"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)} {st.st_mode:o} {int(st.st_mtime)}\n".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", ["qemu-x86_64", "factory-gateway-gpu"])
def test_context_is_deterministic(name: str, tmp_path: Path) -> None:
    a = make_context(plan(name), tmp_path / "a")
    b = make_context(plan(name), tmp_path / "b")
    assert _tree_digest(a) == _tree_digest(b)
    assert (a / "Containerfile").read_text() == render_containerfile(plan(name))
    assert (a / "models/digits/1.0.0/model.onnx").read_bytes() == (ROOT / "models/digits/digits.onnx").read_bytes()


def test_context_replaces_stale_output(tmp_path: Path) -> None:
    out = tmp_path / "ctx"
    out.mkdir()
    (out / "leftover").write_text("old")
    make_context(plan("qemu-x86_64"), out)
    assert not (out / "leftover").exists()
    assert not (tmp_path / "ctx.tmp").exists()


@pytest.mark.parametrize("name", CLASSES)
def test_hadolint_passes(name: str, tmp_path: Path) -> None:
    hadolint = require_tool("hadolint")
    ctx = make_context(plan(name), tmp_path / "ctx")
    proc = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(ctx / "Containerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", CLASSES)
def test_layer_order_slow_first_model_and_release_last(name: str) -> None:
    lines = render_containerfile(plan(name)).splitlines()
    instr = [ln.split()[0] for ln in lines if ln and not ln.startswith((" ", "#"))]
    # a global ARG (the rechunked OS image: apt) may come first; then FROM
    assert instr[0] == "FROM" or (instr[:2] == ["ARG", "FROM"] and lines[instr_at(lines, 0)] == "ARG KILN_OS_IMAGE")
    text = "\n".join(lines)
    order = ["install", "COPY runtime/", "COPY overlays/", "COPY models/", "ARG VERSION",
             "COPY release/", "LABEL containers.bootc"]
    positions = [text.index(marker) for marker in order]
    assert positions == sorted(positions)
    assert lines[-1].startswith("RUN ") and "launch.py kiln-lint /" in lines[-1]
    if plan(name).hc.spec.base.family.has_bootc:
        assert "bootc container lint" in lines[-1]


def instr_at(lines: list[str], n: int) -> int:
    """The index in LINES of the Nth instruction."""
    return [i for i, ln in enumerate(lines) if ln and not ln.startswith((" ", "#"))][n]


def _layer_instructions(text: str) -> list[str]:
    """The RUN, COPY and ADD instructions of the OS stage and the final stage, continuation lines joined
    (each makes a layer of the image; the build-only kernel-modules stage makes none)."""
    out, current, build_only = [], "", False
    for line in text.splitlines():
        if line.startswith("FROM "):
            build_only = line.endswith(" AS kernel-modules")
        if build_only or (not current and (not line.strip() or line.startswith("#"))):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            if current.split(" ", 1)[0] in ("RUN", "COPY", "ADD"):
                out.append(current.strip())
            current = ""
    return out


@pytest.mark.parametrize("name", CLASSES)
def test_every_layer_has_a_group_slow_to_fast(name: str) -> None:
    rendered = finalize_containerfile(plan(name))
    instructions = _layer_instructions(rendered.text)
    assert len(rendered.layer_groups) == len(instructions), "a RUN/COPY/ADD in the templates lacks layer(...)"
    ranks = [LAYER_GROUPS.index(g) for g in rendered.layer_groups]
    assert ranks == sorted(ranks), list(zip(rendered.layer_groups, instructions, strict=True))
    by_group = dict(zip(instructions, rendered.layer_groups, strict=True))
    for m in plan(name).models:  # one layer per model
        assert by_group[f"COPY models/{m.name}/ /usr/share/kiln/models/{m.name}/"] == "model"
    assert rendered.layer_groups.count("model") == len(plan(name).models)
    assert by_group["COPY release/ /usr/lib/kiln/"] == "release"
    assert rendered.layer_groups[-1] == "lint" and "kiln-lint" in instructions[-1]


def test_registry_base_is_pinned_by_digest() -> None:
    text = render_containerfile(plan("medical-cart-cpu"))
    assert "FROM quay.io/centos-bootc/centos-bootc:stream9@sha256:3a75c664" in text


def test_version_only_changes_the_release_lines() -> None:
    a = render_containerfile(plan("qemu-x86_64", "1.0.0")).splitlines()
    b = render_containerfile(plan("qemu-x86_64", "1.0.1")).splitlines()
    changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    assert [a[i] for i in changed] == ["ARG VERSION=1.0.0"]


def test_release_json_and_labels(tmp_path: Path) -> None:
    import json

    p = plan("factory-gateway-gpu")
    ctx = make_context(p, tmp_path / "ctx")
    release = json.loads((ctx / "release/release.json").read_text())
    assert json.loads((ctx / "release/class.json").read_text())["metadata"]["name"] == "factory-gateway-gpu"
    assert release["class"] == "factory-gateway-gpu"
    assert release["compatible"] == "acme-factory,factory-gateway-gpu"
    assert release["version"] == "1.2.3"
    assert release["driverVersion"] == "535.309.01-0+deb12u1"
    digest = hashlib.sha256((ROOT / "models/digits/digits.onnx").read_bytes()).hexdigest()
    assert release["models"][0]["sha256"] == digest
    labels = dict(p.labels)
    assert labels["dev.kiln.model.digits.digest"] == f"sha256:{digest}"
    assert (ctx / "class/usr/lib/bootc/kargs.d/10-kiln.toml").read_text().count("nvidia-drm.modeset=1") == 1
    assert release["sharing"] == {"strategy": "time-slicing", "replicas": 4}  # the device's worker count
    assert release["fallback"] == {"policy": "degrade", "p95LatencyMs": 50.0}
    assert (ctx / "overlays/usr/lib/systemd/system/kiln-nvidia-cdi.service").exists()
    assert "nvidia-container-toolkit" not in (ctx / "Containerfile").read_text()  # toolkit.source: none


def test_ssh_key_only_for_development_classes(tmp_path: Path) -> None:
    hc = load_class("qemu-x86_64", ROOT / "images")
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKilnTestKeyOnly kiln-dev"
    ctx = make_context(finalize_plan(hc, source="images/qemu-x86_64.yaml", ssh_public_key=key), tmp_path / "dev")
    assert (ctx / "class/usr/lib/kiln/ssh/authorized_keys").read_text() == key + "\n"
    conf = (ctx / "class/etc/ssh/sshd_config.d/50-kiln-dev.conf").read_text()
    assert "AuthorizedKeysFile .ssh/authorized_keys /usr/lib/kiln/ssh/authorized_keys" in conf
    assert "PasswordAuthentication no" in conf
    # without a key (kiln render), and for production classes, nothing is baked
    plain = make_context(finalize_plan(hc, source="images/qemu-x86_64.yaml"), tmp_path / "plain")
    assert not (plain / "class/usr/lib/kiln/ssh").exists()
    with pytest.raises(ValueError, match="production class"):
        finalize_plan(load_class("medical-cart-cpu", ROOT / "images"), source="x", ssh_public_key=key)


def test_sshd_is_hardened_whenever_it_is_installed(tmp_path: Path) -> None:
    """Finding: the enabled sshd ran with the distribution's defaults (passwords, keyboard-interactive)
    whenever no per-build key was baked, e.g. `kiln render`."""
    hc = load_class("qemu-x86_64", ROOT / "images")
    plain = make_context(finalize_plan(hc, source="images/qemu-x86_64.yaml"), tmp_path / "plain")
    conf = (plain / "class/etc/ssh/sshd_config.d/40-kiln.conf").read_text()
    for line in ("PasswordAuthentication no", "KbdInteractiveAuthentication no", "PermitEmptyPasswords no",
                 "PermitRootLogin prohibit-password"):
        assert line in conf.splitlines()
    # A class without SSH gets no sshd configuration at all.
    cart = make_context(plan("medical-cart-cpu"), tmp_path / "cart")
    assert not (cart / "class/etc/ssh").exists()


def test_debian_images_carry_the_ca_bundle_the_agent_verifies_tls_with() -> None:
    """Finding: a Debian production class without ca-certificates in its packages made an image whose
    agent could not verify any registry's TLS certificate."""
    from builder.image.render import finalize_os_packages

    hc = load_class("factory-gateway-gpu", ROOT / "images")
    assert "ca-certificates" not in hc.spec.packages
    assert "ca-certificates" in finalize_os_packages(hc)


def test_spec_labels_never_override_kilns_own() -> None:
    """Finding: metadata.labels could set dev.kiln.compatible (or the version) of an image."""
    from builder.image.render import finalize_labels

    hc = load_class("qemu-x86_64", ROOT / "images")
    forged = hc.model_copy(update={"metadata": hc.metadata.model_copy(
        update={"labels": {"dev.kiln.compatible": "evil,other", "team": "vision"}})})
    labels = dict(finalize_labels(forged, ()))
    assert labels["dev.kiln.compatible"] == hc.spec.compatible
    assert labels["team"] == "vision"


def test_nearest_versions_and_wheel_tags() -> None:
    """The pin check's pure parts (builder.base.pins): which wheels an image can install, nearest versions."""
    from packaging.version import Version

    from builder.base import pins
    from builder.base.wheels import finalize_target

    tags = pins.finalize_tags(finalize_target(load_class("qemu-x86_64", ROOT / "images")))
    files: list[dict[str, object]] = [
        {"filename": "onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"},
        {"filename": "onnxruntime-1.31.0-cp312-cp312-manylinux_2_27_x86_64.whl"},  # another Python
        {"filename": "onnxruntime-1.30.0-cp311-cp311-manylinux_2_39_x86_64.whl"},  # glibc newer than bookworm's
        {"filename": "onnxruntime-1.29.0-cp311-cp311-manylinux_2_27_aarch64.whl"},  # another machine
        {"filename": "onnxruntime-1.28.0-cp311-cp311-manylinux_2_27_x86_64.whl", "yanked": True},
        {"filename": "onnxruntime-1.27.0-cp311-cp311-manylinux_2_27_x86_64.whl"},
        {"filename": "onnxruntime-1.27.0.tar.gz"},
    ]
    assert pins.published_versions(files, tags) == [Version("1.27.0"), Version("1.31.1")]
    versions = [Version(v) for v in ("1.20.0", "1.30.0", "1.31.0", "1.31.1", "1.33.0")]
    assert pins.finalize_nearest("1.32.0", versions, 3) == ["1.33.0", "1.31.1", "1.31.0"]
    assert pins.finalize_nearest("9.0", versions, 2) == ["1.33.0", "1.31.1"]


def test_nvidia_modules_are_built_in_a_stage_the_image_does_not_keep() -> None:
    rendered = finalize_containerfile(plan("factory-gateway-gpu"))
    stages = rendered.text.split("\nFROM ")
    assert len(stages) == 4 and stages[1].startswith("localhost/kiln/base/debian:bookworm-20261101T000000Z AS "
                                                     "kernel-modules")
    assert stages[2].startswith("localhost/kiln/base/debian:bookworm-20261101T000000Z AS os")
    modules, image = stages[1], stages[2] + stages[3]
    assert stages[3].startswith("${KILN_OS_IMAGE}")
    assert '"linux-headers-$kver"' in modules and "nvidia-kernel-dkms=535.309.01-0+deb12u1" in modules
    assert "linux-headers" not in image and "dkms" not in image.replace("updates/dkms", "")
    assert "COPY --from=kernel-modules /out/ /" in image
    for pkg in ("libcuda1", "libnvidia-ml1", "nvidia-smi", "nvidia-kernel-support", "firmware-nvidia-gsp"):
        assert f"{pkg}=535.309.01-0+deb12u1" in image
    assert "modinfo -k \"$kver\" nvidia-current nvidia-current-uvm nvidia-current-modeset nvidia-current-drm" in image
    assert "nvidia-container-toolkit" not in rendered.text  # toolkit.source: none
    assert rendered.layer_groups[:4] == ("os", "packages", "drivers", "drivers")


def test_labels_say_what_the_image_contains() -> None:
    labels = dict(plan("factory-gateway-gpu").labels)
    assert labels["dev.kiln.driver"] == "nvidia=535.309.01-0+deb12u1"
    assert labels["dev.kiln.kernel-modules"].startswith("image:nvidia-current,")
    assert labels["dev.kiln.toolkit"] == "absent" and labels["dev.kiln.cdi"] == "boot:kiln-cdi"
    assert labels["dev.kiln.cuda"] == "12" and labels["dev.kiln.runtime"] == "onnxruntime-gpu[cuda,cudnn]==1.26.0"
    jetson = dict(plan("jetson-vision-standard").labels)
    assert jetson["dev.kiln.toolkit"] == "nvidia-container-toolkit=1.16.2"
    assert jetson["dev.kiln.cdi"] == "csv:nvidia-ctk"
    cpu = dict(plan("qemu-x86_64").labels)
    assert (cpu["dev.kiln.driver"], cpu["dev.kiln.toolkit"], cpu["dev.kiln.cdi"]) == ("none", "absent", "none")
    assert "dev.kiln.cuda" not in cpu


def test_context_links_the_wheelhouse_instead_of_copying_it(tmp_path: Path) -> None:
    """The GPU class's wheels are 2 GB: each build context hard-links them (a copy per version filled
    the disk), and the context still renders the same locked requirements and bytes."""
    house = tmp_path / "wheels"
    house.mkdir()
    wheel = house / "numpy-2.2.6-cp311-cp311-manylinux_2_17_x86_64.whl"
    wheel.write_bytes(b"not really a wheel, but bytes to lock\n")
    ctx = make_context(plan("qemu-x86_64"), tmp_path / "ctx", house)
    linked = ctx / "runtime/wheels" / wheel.name
    assert linked.read_bytes() == wheel.read_bytes()
    assert linked.stat().st_ino == wheel.stat().st_ino and wheel.stat().st_nlink == 2
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert f"numpy==2.2.6 --hash=sha256:{digest}" in (ctx / "runtime/requirements.txt").read_text()
