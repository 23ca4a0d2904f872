"""`kiln build` for real: the qemu-x86_64 image, reproducibility, layering, push, bad inputs.

One build of qemu-x86_64 1.0.0 is shared (tests/images.py); the vm tier boots
the same image. The cold rebuild, the model-only release and the docker SDK
build are each a real build too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from bench.projects import make_retrained_project, project_dir
from builder.cli import main
from builder.core import paths, versions
from builder.core.context import make_context
from builder.core.engine import DockerEngine, PodmanEngine
from builder.core.errors import GateFailed, RegistryError, UsageError
from builder.core.net import free_port
from builder.core.run import run
from builder.core.state import StateDir
from builder.image import rechunk, render
from builder.image.build import build_class, finalize_epoch
from builder.release import publish
from builder.release.publish import push_build
from builder.spec import names
from builder.spec.loader import load_class
from tests.conftest import ROOT, require_tool, run_log
from tests.images import QEMU_CLASS, QEMU_VERSION, kiln_test_context, qemu_image
from tests.unit.test_rechunk import describe, layer_of, merged

SOURCE = f"images/{QEMU_CLASS}.yaml"


@pytest.fixture(scope="session")
def record(test_state: StateDir, base_image: Any) -> dict[str, Any]:
    return qemu_image(test_state)


@pytest.fixture(scope="session")
def rootfs(record: dict[str, Any], test_state: StateDir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image's files, exported once (podman create + export)."""
    out = tmp_path_factory.mktemp("rootfs")
    env = test_state.engine_env()
    cid = run(["podman", "create", record["image"]["id"], "/bin/true"], env=env, capture=True).stdout.decode().strip()
    try:
        run(["podman", "export", "--output", out / "rootfs.tar", cid], env=env)
    finally:
        run(["podman", "rm", "--force", cid], env=env, capture=True)
    root = out / "root"
    root.mkdir()
    with tarfile.open(out / "rootfs.tar") as tar:
        tar.extractall(root, filter="tar")
    return root


def groups(rec: dict[str, Any]) -> list[str]:
    return [layer["group"] for layer in rec["layers"]]


# --- fast checks --------------------------------------------------------------


@pytest.mark.unit
def test_layer_groups_follow_the_rendered_containerfile() -> None:
    def layer_groups(name: str) -> tuple[str, ...]:
        hc = load_class(name, ROOT / "images")
        return render.finalize_containerfile(render.finalize_plan(hc, source=f"images/{name}.yaml")).layer_groups

    assert layer_groups("qemu-x86_64") == (
        "os", "packages",  # the class's own packages: a layer of their own (python3-venv, qemu-guest-agent)
        "kernel", "kernel", "runtime", "runtime", "agent", "agent", "agent", "agent", "agent",
        "model",  # one layer per model (digits)
        "release", "lint",
    )
    # one layer per model: the detector class's two models
    assert layer_groups("intel-lowpower-detector").count("model") == 2
    # the kernel-modules stage's RUN is not a layer of the image: the COPY --from of its modules is
    assert layer_groups("factory-gateway-gpu")[:6] == ("os", "packages", "drivers", "drivers", "kernel", "kernel")
    assert layer_groups("jetson-vision-standard")[:4] == ("repositories", "repositories", "repositories", "os")


@pytest.mark.unit
def test_tags_and_destinations() -> None:
    assert names.image_ref("qemu-x86_64", "1.2.3-rc.4") == "localhost/kiln/qemu-x86_64:1.2.3-rc.4"
    assert names.finalize_destination("127.0.0.1:5000/", "c", "1.0.0") == "127.0.0.1:5000/kiln/c:1.0.0"
    for bad in ("1.2.3+build.4", "1", "v1.0"):  # no version outside the grammar becomes a tag
        with pytest.raises(UsageError, match="is not a Kiln version"):
            versions.release_version(bad)
    assert publish.is_loopback("127.0.0.1:5000") and publish.is_loopback("localhost:5000/x")
    assert not publish.is_loopback("registry.example.com:5000")


# --- the image ----------------------------------------------------------------


@pytest.mark.container
def test_build_record(record: dict[str, Any], test_state: StateDir) -> None:
    assert record["class"] == QEMU_CLASS and record["version"] == QEMU_VERSION
    assert record["image"]["ref"] == f"localhost/kiln/{QEMU_CLASS}:{QEMU_VERSION}"
    assert record["image"]["id"].startswith("sha256:")
    assert PodmanEngine(test_state).inspect(record["image"]["ref"])["id"] == record["image"]["id"]
    on_disk = json.loads(paths.record_path(QEMU_CLASS, QEMU_VERSION).read_text())
    assert on_disk["image"]["id"] == record["image"]["id"]
    g = groups(record)
    # the base's layer and the OS stage's, rechunked by package: the bottom of the image
    assert g[0] == "os" and g.count("os") >= 10 and "base" not in g and "unknown" not in g
    assert g[-2:] == ["lint", "boot"]  # verified boot: the signed UKIs on top, bound to every layer below
    assert "packages" not in g
    assert g.index("os") < g.index("kernel") < g.index("runtime") < g.index("agent") < g.index("model") \
        < g.index("release")
    assert [m["name"] for m in record["models"]] == ["digits"]
    for model in record["models"]:
        assert model["layer"] in [layer["diffId"] for layer in record["layers"] if layer["group"] == "model"]
        assert record["labels"][f"dev.kiln.model.{model['name']}.digest"] == model["sha256"]
    assert record["labels"]["org.opencontainers.image.version"] == QEMU_VERSION
    assert set(record["durations"]) >= {"offline base", "optimize and gate the models"}


@pytest.mark.container
def test_image_is_a_bootable_os(rootfs: Path, record: dict[str, Any], test_state: StateDir) -> None:
    (kver,) = [p.name for p in (rootfs / "usr/lib/modules").iterdir()]
    kdir = rootfs / "usr/lib/modules" / kver
    assert (kdir / "vmlinuz").stat().st_size > 5_000_000
    assert (kdir / "initramfs.img").stat().st_size > 5_000_000
    # the image's own lsinitramfs (initramfs-tools is not a host tool)
    listing = run(["podman", "run", "--rm", "--network", "none", record["image"]["id"], "lsinitramfs",
                   f"/usr/lib/modules/{kver}/initramfs.img"], env=test_state.engine_env(), capture=True,
                  quiet=True).stdout.decode()
    for needed in ("erofs.ko", "overlay.ko", "ext4.ko", "scripts/local-bottom/kiln-overlay"):
        assert needed in listing, needed
    assert list((rootfs / "boot").iterdir()) == []
    release = json.loads((rootfs / "usr/lib/kiln/release.json").read_text())
    assert (release["class"], release["version"], release["compatible"]) == (QEMU_CLASS, QEMU_VERSION,
                                                                            "kiln,qemu-x86_64")
    assert [m["sha256"] for m in release["models"]] == [m["sha256"].removeprefix("sha256:")
                                                        for m in record["models"]]
    mdir = rootfs / "usr/share/kiln/models/digits/1.0.0"
    assert {p.name for p in mdir.iterdir()} == {"model.onnx", "report.json", "golden.npz"}
    assert (rootfs / "usr/lib/kiln/class.json").is_file()
    assert (rootfs / "usr/lib/systemd/system/kiln-inference.service").is_file()
    assert (rootfs / "etc/systemd/system/multi-user.target.wants/kiln-inference.service").is_symlink()
    # the development key: the public half baked, the private half in build/<class>/ssh only
    pub = paths.ssh_key_path(QEMU_CLASS).with_suffix(".pub").read_text().strip()
    assert (rootfs / "usr/lib/kiln/ssh/authorized_keys").read_text().strip() == pub
    assert not list((rootfs / "etc/ssh").glob("ssh_host_*"))
    # merged /usr by mmdebstrap's merged-usr hooks: no usrmerge, so no perl beyond perl-base (57 MB)
    dpkg = rootfs / "var/lib/dpkg/info"
    assert (dpkg / "usr-is-merged.list").is_file() and not (dpkg / "usrmerge.list").exists()
    assert not (rootfs / "usr/share/perl").exists() and (rootfs / "usr/bin/perl").is_file()
    # netavark for skopeo's container-network-stack, not the CNI plugins (45 MB)
    assert not (rootfs / "usr/lib/cni").exists() and (dpkg / "netavark.list").is_file()
    assert (rootfs / "etc/machine-id").read_text() == ""
    # kiln_device's bytecode is baked: /usr is read-only, and each start would compile it again
    package = rootfs / "usr/lib/kiln/python/kiln_device"
    missing = [str(py.relative_to(package)) for py in package.rglob("*.py")
               if not list((py.parent / "__pycache__").glob(f"{py.stem}.cpython-*.pyc"))]
    assert missing == []


@pytest.mark.container
def test_users_carry_the_build_epoch_not_the_build_day(rootfs: Path) -> None:
    """useradd and systemd-sysusers write the day a user was made into /etc/shadow; with the build's
    SOURCE_DATE_EPOCH every user's day is the epoch's, so a build the next day gives the same digest."""
    day = str(finalize_epoch() // 86400)
    for name in ("shadow", "shadow-"):  # the backup useradd leaves is in the image too
        fields = [line.split(":") for line in (rootfs / "etc" / name).read_text().splitlines()]
        assert {f[0]: f[2] for f in fields if f[2] != day} == {}, name
    users = {line.split(":")[0] for line in (rootfs / "etc/shadow").read_text().splitlines()}
    assert {"root", "tss", "sshd", "kiln-inference"} <= users  # made by the base, packages and sysusers


@pytest.mark.container
def test_runtime_venv_runs_the_model_offline(rootfs: Path, record: dict[str, Any], test_state: StateDir) -> None:
    """The image's own Python and venv load the baked model (run in the image, no network)."""
    proc = run(["podman", "run", "--rm", "--network", "none", record["image"]["id"],
                "/usr/lib/kiln/venv/bin/python", "-c",
                "import onnxruntime as o, json; r = json.load(open('/usr/lib/kiln/release.json'));"
                "s = o.InferenceSession(r['models'][0]['path']); print(o.__version__, s.get_providers()[0])"],
               env=test_state.engine_env(), capture=True)
    assert proc.stdout.decode().split() == ["1.32.0", "CPUExecutionProvider"]


@pytest.mark.container
def test_golden_health_check_passes_in_the_image(record: dict[str, Any], test_state: StateDir) -> None:
    proc = run(["podman", "run", "--rm", "--network", "none", record["image"]["id"],
                "/usr/libexec/kiln/kiln-health-inference"],
               env=test_state.engine_env(), capture=True, check=False)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


@pytest.mark.container
def test_image_lints_pass_on_the_exported_rootfs(rootfs: Path) -> None:
    from builder.image.lint import lint_rootfs

    assert lint_rootfs(rootfs) == []


@pytest.mark.container
def test_cached_rebuild_gives_the_same_image(record: dict[str, Any], test_state: StateDir) -> None:
    again = build_class(kiln_test_context(test_state), load_class(QEMU_CLASS, ROOT / "images"), source=SOURCE,
                        version=QEMU_VERSION)
    assert again["image"]["id"] == record["image"]["id"]
    assert again["durations"][f"build {record['image']['ref']} with podman"] < 60


@pytest.mark.container
def test_cold_build_gives_the_same_digest(record: dict[str, Any], test_state: StateDir) -> None:
    """No cached layers at all: every RUN runs again, and the image id is the same."""
    cold = build_class(kiln_test_context(test_state), load_class(QEMU_CLASS, ROOT / "images"), source=SOURCE,
                       version=QEMU_VERSION, no_cache=True)
    assert cold["image"]["id"] == record["image"]["id"]
    assert [layer["diffId"] for layer in cold["layers"]] == [layer["diffId"] for layer in record["layers"]]


@pytest.mark.container
def test_rechunked_os_is_the_stage_file_for_file_and_reproducible(record: dict[str, Any], test_state: StateDir,
                                                                   tmp_path: Path) -> None:
    """The image's OS layers (builder.image.rechunk) hold exactly the OS stage's files, one package's files in
    one layer, and rechunking the stage again gives the same bytes."""
    stage = record["osStage"]
    assert stage["rechunked"] == rechunk.chunked_ref(QEMU_CLASS, stage["stage"])
    env = test_state.engine_env()
    run(["podman", "save", "--format", "docker-archive", "--output", tmp_path / "stage.tar", stage["stage"]],
        env=env, capture=True)
    with tarfile.open(tmp_path / "stage.tar") as tar:
        tar.extractall(tmp_path / "stage", filter="data")
    (tmp_path / "stage.tar").unlink()
    made = rechunk.rechunk_archive(rechunk.read_archive(tmp_path / "stage"), tmp_path / "out", "x", finalize_epoch())
    os_layers = [layer for layer in record["layers"] if layer["group"] == "os"]
    assert [d for _, d, _ in made.layers] == [layer["diffId"] for layer in os_layers]
    assert record["layers"][:len(os_layers)] == os_layers  # the bottom of the image
    names_ = [name for name, _, _ in made.layers]
    assert {"pkg-linux-signed-amd64", "pkg-systemd", "pkg-python3.11"} <= set(names_) and names_[-1] == "rest"
    assert "pkg-golang-github-containernetworking-plugins" not in names_  # netavark instead (render.py)
    assert stage["layers"] == made.table()  # build.json says which layer holds which source package
    assert "glibc" in next(layer["sources"] for layer in stage["layers"] if layer["name"] == "pkg-glibc")

    stage_archive = rechunk.read_archive(tmp_path / "stage")
    before = rechunk.Tree()
    for i, path in enumerate(stage_archive.layers):
        with tarfile.open(path, "r:") as tar:
            before.apply(i, iter(tar))
    after, layers = merged(tmp_path / "out")
    assert describe(after, layers) == describe(before, stage_archive.layers)
    where = layer_of(tmp_path / "out", made)
    kver = record["contents"]["kernel"]
    assert where[f"usr/lib/modules/{kver}/modules.dep"] == "pkg-linux-signed-amd64"  # depmod's, with the kernel
    assert where["usr/lib/udev/hwdb.bin"] == "pkg-systemd"
    assert where["var/lib/dpkg/status"] == "rest"
    rest = next(p for name, d, _ in made.layers if name == "rest"
                for p in [tmp_path / "out" / f"{d.removeprefix('sha256:')}.tar"])
    assert rest.stat().st_size < 8 * 1024 * 1024, "what no package owns grew: it moves with every update"


# --- a model-only release -------------------------------------------------------


@pytest.fixture
def project_copy(tmp_path: Path) -> Iterator[Path]:
    """A model-only release of the project (tests/images.py), as KILN_PROJECT_DIR."""
    with project_dir(make_retrained_project(tmp_path / "project")) as proj:
        yield proj


@pytest.mark.container
def test_model_only_release_changes_only_model_and_release_layers(
    record: dict[str, Any], test_state: StateDir, project_copy: Path
) -> None:
    hc = load_class(QEMU_CLASS, project_copy / "images")
    new = build_class(kiln_test_context(test_state), hc, source=SOURCE, version="1.0.1", revision=record["revision"])
    assert new["models"][0]["sha256"] != record["models"][0]["sha256"]
    changed = {old["group"] for old, cur in zip(record["layers"], new["layers"], strict=True)
               if old["diffId"] != cur["diffId"]}
    assert changed == {"model", "release", "boot"}  # the boot layer's UKIs bind the new layer list
    assert new["boot"]["layers"] != record["boot"]["layers"]
    assert groups(new) == groups(record)


@pytest.mark.container
def test_refused_model_is_never_built(test_state: StateDir, project_copy: Path) -> None:
    """Blank calibration frames: the gate refuses the model, nothing is built or recorded."""
    import numpy as np

    cal = project_copy / "models/digits/data/calibration.npz"
    x = np.load(cal)["x"]
    np.savez(cal, x=np.zeros_like(x))
    spec = project_copy / "images" / f"{QEMU_CLASS}.yaml"
    spec.write_text(spec.read_text().replace("precision: auto", "precision: int8"))
    hc = load_class(QEMU_CLASS, project_copy / "images")
    with pytest.raises(GateFailed) as exc:
        build_class(kiln_test_context(test_state), hc, source=SOURCE, version="9.9.9")
    assert exc.value.exit_code == 5
    assert not paths.record_path(QEMU_CLASS, "9.9.9").exists()  # KILN_PROJECT_DIR is project_copy
    assert not PodmanEngine(test_state).exists(f"localhost/kiln/{QEMU_CLASS}:9.9.9")


# --- registry -------------------------------------------------------------------


@pytest.mark.container
def test_push_and_pull_back_by_digest(record: dict[str, Any], registry: str, test_state: StateDir,
                                      tmp_path: Path) -> None:
    skopeo = require_tool("skopeo")
    pushed = push_build(kiln_test_context(test_state), QEMU_CLASS, QEMU_VERSION, registry)
    entry = pushed["pushed"][-1]
    assert entry["ref"] == f"{registry}/kiln/{QEMU_CLASS}:{QEMU_VERSION}"
    assert entry["digest"] != record["image"]["digest"]  # compressed for the registry: a new manifest
    saved = json.loads(paths.record_path(QEMU_CLASS, QEMU_VERSION).read_text())
    assert saved["pushed"][-1]["digest"] == entry["digest"]
    # pull by digest into an OCI layout: the same config (image id) and layers come back
    layout = tmp_path / "layout"
    subprocess.run([skopeo, "copy", "--src-tls-verify=false", f"docker://{entry['byDigest']}",
                    f"oci:{layout}:pulled"], check=True, capture_output=True)
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"]
    assert manifest_digest == entry["digest"]
    manifest = json.loads((layout / "blobs/sha256" / manifest_digest.split(":")[1]).read_text())
    assert manifest["config"]["digest"] == record["image"]["id"]
    config = json.loads((layout / "blobs/sha256" / record["image"]["id"].split(":")[1]).read_text())
    assert config["rootfs"]["diff_ids"] == [layer["diffId"] for layer in record["layers"]]


@pytest.mark.container
def test_cli_push_to_an_unreachable_registry(record: dict[str, Any], test_state: StateDir) -> None:
    port = free_port()
    with pytest.raises(RegistryError, match=f"127.0.0.1:{port}"):
        push_build(kiln_test_context(test_state), QEMU_CLASS, QEMU_VERSION, f"127.0.0.1:{port}")
    r = CliRunner().invoke(main, ["push", QEMU_CLASS, f"127.0.0.1:{port}", "--version", QEMU_VERSION],
                           env={"KILN_STATE_DIR": str(test_state.root)})
    assert r.exit_code == 8, r.output
    assert "Traceback" not in r.output


@pytest.mark.container
def test_push_of_an_unbuilt_version_is_a_clear_error(registry: str) -> None:
    r = CliRunner().invoke(main, ["push", QEMU_CLASS, registry, "--version", "7.7.7"])
    assert r.exit_code == 7
    assert "has not been built here" in r.output and "kiln build qemu-x86_64 --version 7.7.7" in r.output


# --- docker SDK ------------------------------------------------------------------


@pytest.mark.container
def test_docker_sdk_builds_the_class(docker_engine: DockerEngine, record: dict[str, Any]) -> None:
    """The same class through the Docker API (a podman service started by the test)."""
    rec = build_class(make_context(docker_engine), load_class(QEMU_CLASS, ROOT / "images"), source=SOURCE,
                      version="1.0.0-docker")
    assert rec["engine"]["name"] == "docker" and rec["engine"]["reproducible"] is False
    assert groups(rec) == groups(record)
    assert rec["labels"]["dev.kiln.class"] == QEMU_CLASS
    # the base and the OS layers are shared with the podman build: the same bytes
    assert rec["layers"][0]["diffId"] == record["layers"][0]["diffId"]


# --- bad inputs --------------------------------------------------------------------


@pytest.mark.container
def test_engine_missing(path_only: Callable[..., None]) -> None:
    path_only("git")
    recorded = paths.record_path(QEMU_CLASS, QEMU_VERSION)
    before = recorded.read_bytes() if recorded.exists() else None
    r = CliRunner().invoke(main, ["build", QEMU_CLASS, "--version", QEMU_VERSION])
    assert r.exit_code == 3, r.output
    assert "podman not found" in r.output and "apt-get install podman" in r.output
    # refused before anything was built: the last good record is still there, untouched
    assert (recorded.read_bytes() if recorded.exists() else None) == before


@pytest.mark.container
def test_base_and_mmdebstrap_missing(scratch_state: StateDir, path_only: Callable[..., None]) -> None:
    path_only("podman", "runc", "git", "ssh-keygen")
    r = CliRunner().invoke(main, ["build", QEMU_CLASS, "--version", "1.0.0-nobase"],
                           env={"KILN_STATE_DIR": str(scratch_state.root)})
    assert r.exit_code == 3, r.output
    assert "mmdebstrap not found" in r.output
    assert not list(scratch_state.base_dir.glob("*/rootfs.tar"))


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs as the state dir: the base does not fit."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "kiln-test", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.container
def test_disk_full_in_the_state_dir(tiny_state: Path) -> None:
    require_tool("mmdebstrap")
    r = CliRunner().invoke(main, ["base"], env={"KILN_STATE_DIR": str(tiny_state)})
    assert r.exit_code == 7, r.output
    assert "mmdebstrap failed" in r.output and "Traceback" not in r.output
    base = tiny_state / "base" / "debian-bookworm-x86_64"
    # nothing a later build would trust: no tarball, no stamp, no temporary leftovers
    assert sorted(p.name for p in base.iterdir()) == ["lock"]
    assert list((tiny_state / "tmp").iterdir()) == []


@pytest.mark.container
@pytest.mark.parametrize("cls, reason", [
    ("jetson-vision-standard", "a l4t base: Kiln bootstraps Debian bases only"),
    ("medical-cart-cpu", "is not in local storage and needs a registry"),
])
def test_classes_that_cannot_build_here_fail_fast(cls: str, reason: str, podman: PodmanEngine,
                                                  test_state: StateDir) -> None:
    r = CliRunner().invoke(main, ["build", cls, "--version", "1.0.0"], env={"KILN_STATE_DIR": str(test_state.root)})
    assert r.exit_code == 7, r.output
    assert f"{cls} cannot be built on this machine" in r.output and reason in r.output
    assert "==> optimize" not in r.output  # refused before any work


@pytest.mark.container
def test_push_to_a_tls_registry_with_auth(record: dict[str, Any], test_state: StateDir, tmp_path: Path) -> None:
    """`kiln registry start --tls --htpasswd`: push needs the credentials and trusts the CA in --cert-dir. A signed
    push with a password and a passphrase-protected release key: neither is ever on a command line (sampled from
    /proc/*/cmdline while it runs) nor in what Kiln prints or leaves in its state directory."""
    import secrets
    import threading

    from builder.keys.release_key import make_signing_key
    from builder.release.registry import running_registry

    require_tool("openssl")
    password, phrase = f"pw-{secrets.token_hex(8)}", f"phrase-{secrets.token_hex(8)}"
    (tmp_path / "phrase").write_text(phrase + "\n")
    (tmp_path / "phrase").chmod(0o600)
    os.environ["KILN_KEY_PASSPHRASE_FILE"] = str(tmp_path / "phrase")
    try:
        key = make_signing_key(tmp_path / "release-key")
    finally:
        del os.environ["KILN_KEY_PASSPHRASE_FILE"]
    assert json.loads((key.directory / "key.json").read_text())["passphrase"] is True
    with running_registry(tmp_path / "reg", tls=True, htpasswd=f"kiln:{password}") as info:
        certs = tmp_path / "certs"
        certs.mkdir()
        shutil.copyfile(info.root / "tls/cert.pem", certs / "ca.crt")
        ctx = kiln_test_context(test_state)
        with pytest.raises(RegistryError, match=r"authentication required|unauthorized"):
            push_build(ctx, QEMU_CLASS, QEMU_VERSION, info.address, tls_verify=True, cert_dir=certs)
        seen: set[str] = set()
        done = threading.Event()

        def sample() -> None:  # every command line on the machine, while the push runs
            while not done.is_set():
                for f in Path("/proc").glob("[0-9]*/cmdline"):
                    with contextlib.suppress(OSError):
                        seen.add(f.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
                done.wait(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        kiln = [str(Path(sys.executable).parent / "kiln"), "push", QEMU_CLASS, info.address,
                "--version", QEMU_VERSION, "--tls-verify", "--cert-dir", str(certs), "--sign-by", str(key.directory)]
        env = {**os.environ, "KILN_STATE_DIR": str(test_state.root),
               "KILN_KEY_PASSPHRASE_FILE": str(tmp_path / "phrase")}
        try:
            by_env = subprocess.run(kiln, env={**env, "KILN_REGISTRY_CREDS": f"kiln:{password}"}, capture_output=True,
                                    text=True, timeout=600)
            by_stdin = subprocess.run([*kiln, "--username", "kiln", "--password-stdin"], input=password + "\n",
                                      env=env, capture_output=True, text=True, timeout=600)
            wrong = subprocess.run(kiln, env={**env, "KILN_REGISTRY_CREDS": "kiln:not-the-password"},
                                   capture_output=True, text=True, timeout=600)
            unlocked = subprocess.run(kiln, env={**os.environ, "KILN_STATE_DIR": str(test_state.root),
                                                 "KILN_REGISTRY_CREDS": f"kiln:{password}",
                                                 "KILN_KEY_PASSPHRASE": "not-the-phrase"},
                                      capture_output=True, text=True, timeout=600)
        finally:
            done.set()
            sampler.join()
        assert by_env.returncode == 0, by_env.stderr
        assert by_stdin.returncode == 0, by_stdin.stderr
        assert wrong.returncode != 0 and "not-the-password" not in wrong.stdout + wrong.stderr, wrong.stderr
        assert unlocked.returncode != 0 and "signing" in unlocked.stderr, unlocked.stderr
        pushed = run_log(by_env.stderr)
        assert " podman push " in pushed and "--authfile" in pushed  # logged, with no secret
        assert any("skopeo" in c and "--passphrase-file" in c for c in seen), "the sampler saw no signing"
        done.clear()
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            released = release_verify_and_report(info.address, certs, env, f"kiln:{password}", tmp_path, test_state)
        finally:
            done.set()
            sampler.join()
    leaks = [c for c in seen if password in c or phrase in c]
    assert not leaks, leaks
    for proc in (by_env, by_stdin, wrong, unlocked, *released):
        assert password not in proc.stdout + proc.stderr and phrase not in proc.stdout + proc.stderr
    kept = [d for d in test_state.root.iterdir() if d.name not in ("containers", "base", "wheels")]  # not logs
    logs = [*(f for d in kept for f in d.rglob("*")), *(tmp_path / "reg").rglob("*"),
            *paths.class_dir(QEMU_CLASS).rglob("*.json")]
    for f in logs:
        if f.is_file() and not f.is_symlink() and f.stat().st_size < 50_000_000:
            data = f.read_bytes()
            assert password.encode() not in data and phrase.encode() not in data, f
    assert not list(test_state.tmp_dir.glob("auth-*")) and not list(test_state.tmp_dir.glob("passphrase-*"))


def release_verify_and_report(registry: str, certs: Path, env: dict[str, str], creds: str, tmp: Path,
                              state: StateDir) -> list[subprocess.CompletedProcess[str]]:
    """`kiln release` to a registry with a password: a signed image, SBOM and provenance; `kiln verify` accepts them
    and refuses each one tampered; the release report shows the record's and the registry's figures in Chromium.
    The processes it ran (their output is checked for secrets by the caller)."""
    from builder.core import secrets
    from builder.release import attest
    from builder.release.signing import Access

    chromium = shutil.which("chromium") or require_tool("chromium")
    kiln = str(Path(sys.executable).parent / "kiln")
    env = {k: v for k, v in env.items() if not k.startswith("KILN_KEY_PASSPHRASE")} | {"KILN_REGISTRY_CREDS": creds}
    lookaside = tmp / "lookaside"
    tls = ["--tls-verify", "--cert-dir", str(certs)]
    ran = [subprocess.run([kiln, "release", QEMU_CLASS, "--version", QEMU_VERSION, "--registry", registry,
                           "--lookaside", str(lookaside), *tls], env=env, capture_output=True, text=True, timeout=900)]
    assert ran[-1].returncode == 0, ran[-1].stderr
    record = json.loads(paths.record_path(QEMU_CLASS, QEMU_VERSION).read_text())
    att, digest = record["attestations"], record["manifest"]["digest"]
    assert att["sbom"]["tag"] == f"{digest.replace(':', '-')}.sbom" and att["att"]["tag"].endswith(".att")
    dev_key = paths.dev_signing_key_dir(QEMU_CLASS)
    image = f"{registry}/kiln/{QEMU_CLASS}:{QEMU_VERSION}"

    def verify(ref: str = image, *, where: str = str(lookaside), key: list[str] | None = None) -> dict[str, Any]:
        ran.append(subprocess.run([kiln, "verify", ref, *(key or ["--key", str(dev_key)]), "--lookaside", where,
                                   *tls, "--json"], env=env, capture_output=True, text=True, timeout=300))
        assert ran[-1].returncode in (0, 11), ran[-1].stderr
        out: dict[str, Any] = json.loads(ran[-1].stdout)
        assert (ran[-1].returncode == 0) == out["ok"], ran[-1].stderr
        return out

    def failed(out: dict[str, Any]) -> list[str]:
        return [c["what"] for c in out["checks"] if not c["ok"]]

    good = verify()
    assert good["ok"] and len(good["checks"]) == 8, good["checks"]
    assert verify(f"{registry}/kiln/{QEMU_CLASS}@{digest}")["ok"]  # by digest alone, as an auditor would
    from builder.release.registry import serving_lookaside

    with serving_lookaside(lookaside) as url:  # the signatures over HTTP, as devices read them; the public key only
        assert verify(where=url, key=["--public-key", str(dev_key / "release-key.asc")])["ok"]
        assert verify(f"{registry}/kiln/{QEMU_CLASS}:stable", where=url)["ok"]  # a channel tag: the same checks
    (tmp / "empty-lookaside").mkdir()
    with serving_lookaside(tmp / "empty-lookaside") as url:  # a lookaside without the signatures
        assert set(failed(verify(where=url))) == {"image signature", "sbom signature", "att signature"}
    status = PodmanEngine(state).read_file(record["image"]["id"], "/var/lib/dpkg/status")
    installed = len(re.findall(rb"^Status: \S+ ok installed$", status, re.MULTILINE))
    assert good["sbom"]["byType"].get("machine-learning-model") == 1
    assert good["sbom"]["models"] == ["digits"]
    assert att["sbomSummary"]["packages"] == installed > 100
    # Tampered, one at a time: another SBOM under its tag, a provenance signature, the image's signature.
    repo = f"{registry}/kiln/{QEMU_CLASS}"
    with secrets.auth_file(registry, secrets.parse_creds(creds, "test"), state.tmp_dir) as auth:
        access = Access(True, auth, certs)
        raw = attest.raw_manifest(f"{repo}@{digest}", access, state)  # skopeo inspect --raw
        pushed = json.loads(raw)
        subject = {"mediaType": pushed["mediaType"], "digest": digest, "size": len(raw)}
        real = attest.make_sbom(attest.gather(record, digest, status))
        assert hashlib.sha256(real).hexdigest() == att["sbom"]["payloadSha256"]  # the same SBOM: deterministic
        forged = real.replace(b'"name": "digits"', b'"name": "digitz"')
        attest.push_artifact(repo, att["sbom"]["tag"], "sbom", forged, subject, access=access, state=state)
        assert failed(verify()) == ["sbom signature"]
        attest.push_artifact(repo, att["sbom"]["tag"], "sbom", real, subject, access=access, state=state)
    assert verify()["ok"]
    for path, what in ((Path(att["att"]["signature"]), "att signature"),
                       (Path(record["signatures"][-1]["path"]), "image signature")):
        kept = path.read_bytes()
        path.write_bytes(kept[:-40] + bytes(40))
        try:
            assert failed(verify()) == [what]
        finally:
            path.write_bytes(kept)
    assert verify()["ok"]
    # The release report, as Chromium shows it.
    report = paths.record_path(QEMU_CLASS, QEMU_VERSION).with_name("release.html")
    assert report.is_file()
    again = tmp / "again.html"  # from a device that already runs this very version: only the config is new
    ran.append(subprocess.run([kiln, "report", QEMU_CLASS, "--version", QEMU_VERSION, "--previous", QEMU_VERSION,
                               "-o", str(again)], env=env, capture_output=True, text=True, timeout=120))
    assert ran[-1].returncode == 0, ran[-1].stderr
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp / 'profile'}"]

    def shown(page: Path) -> dict[str, str]:
        dom = subprocess.run([*common, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                             check=True).stdout
        return dict(re.findall(r'data-k="qemu-x86_64\.([^"]+)"[^>]*>([^<]*)<', dom))

    k = shown(report)
    registry_total = pushed["config"]["size"] + sum(la["size"] for la in pushed["layers"])
    assert k["digest"] == digest and k["version"] == QEMU_VERSION and k["signed"] == "signed"
    assert int(k["layers.total"]) == sum(la["size"] for la in record["layers"])
    assert int(k["download.total"]) == registry_total
    assert int(k["sbom.packages"]) == installed and k["model.digits.precision"] == record["models"][0]["precision"]
    assert k["health"] == "inference-golden, inference-service, agent" and k["stage.1"]
    assert int(shown(again)["download.bytes"]) == pushed["config"]["size"]
    shot = tmp / "report.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2400", report.as_uri()], capture_output=True,
                   timeout=120, check=True, cwd=tmp)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    return ran
