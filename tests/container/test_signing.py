"""Signed pushes for real: gpg, podman, skopeo and a registry on 127.0.0.1.

A tiny image (`podman import` of a few files) stands in for a class image: signing
does not care about the size. Every verdict comes from `skopeo copy --policy` with the
policy.json that images bake, the way a device checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from builder.core import paths, records
from builder.core.context import make_context
from builder.core.engine import PodmanEngine
from builder.core.errors import CommandFailed, RegistryError
from builder.core.run import run
from builder.core.state import StateDir
from builder.keys import device_files, release_key
from builder.release import signing
from builder.release.publish import push_signed
from builder.release.registry import serving_lookaside
from tests import images
from tests.conftest import require_tool

pytestmark = pytest.mark.container
CLS = "signtest"


def import_tiny(state: StateDir, release_json: bytes, ref: str) -> str:
    """`podman import` of one file (usr/lib/kiln/release.json): a tiny image; its id."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("usr/lib/kiln/release.json")
        info.size = len(release_json)
        tar.addfile(info, io.BytesIO(release_json))
    archive = state.tmp_dir / f"{ref.rsplit(':', 1)[-1]}-tiny.tar"
    archive.write_bytes(buf.getvalue())
    try:
        out = run(["podman", "import", archive, ref], env=state.engine_env(), capture=True, quiet=True)
    finally:
        archive.unlink(missing_ok=True)
    return out.stdout.decode().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tiny_image() -> Iterator[tuple[PodmanEngine, str]]:
    require_tool("podman")
    state = images.kiln_test_state()
    yield PodmanEngine(state), import_tiny(state, b'{"class": "signtest"}\n', f"localhost/kiln/{CLS}:1.0.0")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_image: tuple[PodmanEngine, str]) -> Path:
    """A project dir with a build record for the tiny image (push_signed reads it)."""
    monkeypatch.setenv("KILN_PROJECT_DIR", str(tmp_path / "project"))
    record = {"schemaVersion": records.RECORD_SCHEMA, "class": CLS, "version": "1.0.0", "compatible": "kiln,signtest",
              "image": {"id": tiny_image[1], "ref": f"localhost/kiln/{CLS}:1.0.0"}, "pushed": []}
    path = paths.record_path(CLS, "1.0.0")
    path.parent.mkdir(parents=True)
    records.write_record(record)
    return tmp_path / "project"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[release_key.SigningKey, release_key.SigningKey]:
    require_tool("gpg")
    tmp = tmp_path_factory.mktemp("keys")
    return release_key.make_signing_key(tmp / "release"), release_key.make_signing_key(tmp / "other")


def pull(registry: str, ref: str, policy: Path, regd: Path, tmp: Path, state: StateDir) -> bool:
    """Whether a device-style pull of `ref` passes the policy."""
    dest = tmp / "pulled"
    shutil.rmtree(dest, ignore_errors=True)
    try:
        run(["skopeo", "--policy", policy, "--registries.d", regd, "copy", "--quiet", "--remove-signatures",
             "--src-tls-verify=false", f"docker://{registry}/kiln/{CLS}:{ref}", f"oci:{dest}:x"],
            env=state.engine_env(), capture=True)
    except CommandFailed as exc:
        assert "rejected" in str(exc) or "signature" in str(exc).lower(), exc
        return False
    return True


def device_trust(tmp: Path, key: release_key.SigningKey, lookaside_url: str) -> tuple[Path, Path]:
    files = device_files.finalize_device_files(CLS, key)
    policy = json.loads(files["usr/lib/kiln/policy.json"])
    (tmp / "release-key.asc").write_bytes(files["usr/lib/kiln/release-key.asc"])
    policy["transports"]["docker"][""][0]["keyPath"] = str(tmp / "release-key.asc")
    (tmp / "policy.json").write_text(json.dumps(policy))
    regd = tmp / "registries.d"
    regd.mkdir(exist_ok=True)
    (regd / "kiln.yaml").write_text(device_files.render_registries_d(lookaside_url))
    return tmp / "policy.json", regd


def test_signed_release_verifies_on_every_tag_and_nothing_else_does(
    project: Path, tiny_image: tuple[PodmanEngine, str], keys: tuple[release_key.SigningKey, release_key.SigningKey],
    registry: str, tmp_path: Path,
) -> None:
    engine, _ = tiny_image
    key, other = keys
    lookaside = tmp_path / "sigs"
    ctx = make_context(engine, state=engine.state)
    record = push_signed(ctx, CLS, "1.0.0", registry, key=key, lookaside_dir=lookaside, channel="stable")
    # Named in the channel's TUF targets too (the key has its TUF half): path, digest, the manifest's length.
    [named] = record["channels"]
    assert named["target"] == f"{CLS}/stable/1.0.0" and named["digest"] == record["signatures"][-1]["digest"]
    targets = json.loads((lookaside / f"tuf/metadata/{named['targetsVersion']}.targets.json").read_text())
    target = targets["signed"]["targets"][named["target"]]
    assert "sha256:" + target["hashes"]["sha256"] == named["digest"]
    assert target["custom"]["compatible"] == "kiln,signtest" and target["custom"]["version"] == "1.0.0"
    digest = record["signatures"][-1]["digest"]
    assert {p["ref"].rsplit(":", 1)[1] for p in record["pushed"]} == {"1.0.0", "stable"}
    assert signing.signature_path(lookaside, f"kiln/{CLS}", digest).is_file()
    state = engine.state
    with serving_lookaside(lookaside) as url:
        policy, regd = device_trust(tmp_path, key, url)
        assert pull(registry, "stable", policy, regd, tmp_path, state)
        assert pull(registry, "1.0.0", policy, regd, tmp_path, state)
        # The staging tag points at the same digest: it verifies too, but devices never look there.
        # An unsigned image in the same repository does not.
        run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci-archive:{build_unsigned(tmp_path)}:x",
             f"docker://{registry}/kiln/{CLS}:unsigned"], env=state.engine_env(), capture=True)
        assert not pull(registry, "unsigned", policy, regd, tmp_path, state)
        # Another key's policy refuses our signature.
        (tmp_path / "other").mkdir()
        other_policy, _ = device_trust(tmp_path / "other", other, url)
        assert not pull(registry, "stable", other_policy, regd, tmp_path, state)
        # A signature moved next to another digest is refused (it names the manifest it signed).
        unsigned = json.loads(run(["skopeo", "inspect", "--tls-verify=false",
                                   f"docker://{registry}/kiln/{CLS}:unsigned"], capture=True).stdout)["Digest"]
        moved = signing.signature_path(lookaside, f"kiln/{CLS}", unsigned)
        moved.parent.mkdir(parents=True)
        shutil.copy(signing.signature_path(lookaside, f"kiln/{CLS}", digest), moved)
        assert not pull(registry, "unsigned", policy, regd, tmp_path, state)


def test_failed_signing_leaves_no_tag_devices_take(
    project: Path, tiny_image: tuple[PodmanEngine, str], registry: str, tmp_path: Path,
    keys: tuple[release_key.SigningKey, release_key.SigningKey],
) -> None:
    engine, _ = tiny_image
    broken = release_key.SigningKey(keys[0].directory, "0" * 40)  # no such secret key
    with pytest.raises(RegistryError, match="signing"):
        push_signed(make_context(engine, state=engine.state), CLS, "1.0.0", registry, key=broken,
                    lookaside_dir=tmp_path / "sigs", channel="never")
    for tag in ("never",):
        proc = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry}/kiln/{CLS}:{tag}"],
                   capture=True, check=False, quiet=True)
        assert proc.returncode != 0  # the channel tag was never created
    staged = run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                  f"docker://{registry}/kiln/{CLS}:staging-1.0.0"], capture=True, check=False, quiet=True)
    assert staged.returncode == 0


def test_a_released_version_never_changes_digest(
    project: Path, tiny_image: tuple[PodmanEngine, str], registry: str, tmp_path: Path,
    keys: tuple[release_key.SigningKey, release_key.SigningKey],
) -> None:
    """Another build under a released version is refused before any tag moves; the same build again is fine."""
    engine, image_id = tiny_image
    key, _ = keys
    ctx = make_context(engine, state=engine.state)
    lookaside = tmp_path / "sigs"

    def record_as(version: str, image: str) -> None:
        paths.record_path(CLS, version).parent.mkdir(parents=True, exist_ok=True)
        records.write_record({"schemaVersion": records.RECORD_SCHEMA, "class": CLS, "version": version,
                              "compatible": "kiln,signtest", "image": {"id": image, "ref": f"x:{version}"},
                              "pushed": []})

    record_as("3.0.0", image_id)
    digest = push_signed(ctx, CLS, "3.0.0", registry, key=key, lookaside_dir=lookaside,
                         channel="imm")["signatures"][-1]["digest"]
    other = import_tiny(engine.state, b'{"class": "signtest", "rebuilt": true}\n',  # other bytes: another digest
                        f"localhost/kiln/{CLS}:other")
    record_as("3.0.0", other)
    try:
        with pytest.raises(RegistryError, match="never changes digest") as refused:
            push_signed(ctx, CLS, "3.0.0", registry, key=key, lookaside_dir=lookaside, channel="imm")
    finally:
        run(["podman", "rmi", f"localhost/kiln/{CLS}:other"], env=engine.state.engine_env(), capture=True,
            quiet=True, check=False)
    assert digest in str(refused.value)

    def tag(t: str) -> str:
        return "sha256:" + hashlib.sha256(run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                               f"docker://{registry}/kiln/{CLS}:{t}"], capture=True,
                                              quiet=True).stdout).hexdigest()

    assert tag("3.0.0") == digest and tag("imm") == digest  # nothing moved
    record_as("3.0.0", image_id)  # the released build again: safe to run again, nothing changes
    again = push_signed(ctx, CLS, "3.0.0", registry, key=key, lookaside_dir=lookaside, channel="imm")
    assert again["signatures"][-1]["digest"] == digest == tag("imm")


def build_unsigned(tmp: Path) -> Path:
    """A second tiny image as an OCI archive (different bytes, so a different digest)."""
    from tests.ota import make_oci_image

    layout = tmp / "unsigned-layout"
    make_oci_image(layout, "x", {"etc/unsigned": b"not signed\n"}, {})
    archive = tmp / "unsigned.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    return archive


def test_pushed_layers_are_gzip_whatever_the_engine_defaults_to(tiny_image: tuple[PodmanEngine, str],
                                                                registry: str, tmp_path: Path) -> None:
    """Finding (issue 33, 15): the push did not pin a compression, and the agent reads gzip layers only: a podman
    whose containers.conf says zstd (a newer distribution's default) pushed layers every device blocklisted."""
    engine, image_id = tiny_image
    zstd_conf = tmp_path / "containers.conf"
    zstd_conf.write_text(engine.state.containers_conf.read_text().replace('compression_format = "gzip"',
                                                                           'compression_format = "zstd"'))
    assert 'compression_format = "zstd"' in zstd_conf.read_text()
    zstd_engine = PodmanEngine(engine.state)
    zstd_engine.env = {**engine.env, "CONTAINERS_CONF": str(zstd_conf)}
    dest = f"{registry}/kiln/{CLS}:compression"
    digest = zstd_engine.push(image_id, dest, tls_verify=False)
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry}/kiln/{CLS}@{digest}"],
              capture=True, quiet=True).stdout
    layers = json.loads(raw)["layers"]
    assert layers and all(la["mediaType"].endswith(("tar+gzip", "tar.gzip")) for la in layers), layers
