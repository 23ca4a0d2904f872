"""Engines: podman CLI and the docker SDK (against `podman system service`), for real.

Builds run FROM the offline base, in the persistent test state dir shared with
test_base.py (the base is built once and cached).
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from builder.base.bootstrap import BaseImage, write_docker_archive
from builder.core.engine import DockerEngine, Engine, PodmanEngine, finalize_layers, needs_version, select_engine
from builder.core.errors import BuildError, ToolMissing, UsageError
from builder.core.state import StateDir, make_state_dir
from tests.container.conftest import require_docker_sdk

EPOCH = 1735689600
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONTAINERFILE = """\
FROM {base}
# Slow and rarely changing first: reaches the Debian mirror through --network host.
RUN apt-get update \\
 && apt-get install -y --no-install-recommends hello \\
 && apt-get clean \\
 && rm -rf /var/lib/apt/lists/* /var/cache/ldconfig/aux-cache /var/log/*
RUN ulimit -n > /etc/kiln-nofile
COPY payload.txt /usr/share/kiln/payload.txt
# After the slow steps, so a version bump rebuilds only what follows.
ARG VERSION=0
RUN echo "$VERSION" > /usr/lib/kiln-version
LABEL dev.kiln.test="engine"
"""


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory, base_image: BaseImage) -> Path:
    ctx = tmp_path_factory.mktemp("context")
    (ctx / "Containerfile").write_text(CONTAINERFILE.format(base=base_image.ref))
    (ctx / "payload.txt").write_text("payload\n")
    return ctx


@pytest.fixture(scope="session")
def built(podman: PodmanEngine, context: Path) -> str:
    """A cold build (no cache) of the test Containerfile; returns the image id."""
    return podman.build(context, context / "Containerfile", "localhost/kiln-test/engine:1", {"VERSION": "1"}, EPOCH)


def manifest_digest(registry: str, repo: str, ref: str) -> str:
    request = urllib.request.Request(
        f"http://{registry}/v2/{repo}/manifests/{ref}",
        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return "sha256:" + hashlib.sha256(response.read()).hexdigest()


# --- fast checks: marked unit, so they run in the default tier --------------


@pytest.mark.unit
def test_select_engine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    state = make_state_dir(root=tmp_path)
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    assert isinstance(select_engine("auto", state, check=False), PodmanEngine)
    monkeypatch.setenv("DOCKER_HOST", "unix:///run/test.sock")
    engine = select_engine("auto", state, check=False)
    assert isinstance(engine, DockerEngine) and engine.base_url == "unix:///run/test.sock"
    assert isinstance(select_engine("podman", state, check=False), PodmanEngine)
    with pytest.raises(UsageError, match="unknown engine 'buildkit'"):
        select_engine("buildkit", state)


@pytest.mark.unit
def test_version_and_layer_helpers() -> None:
    assert needs_version("3.4.4", (4, 0))
    assert not needs_version("4.3.1", (4, 0))
    assert needs_version("1.40", (1, 41)) and not needs_version("1.41", (1, 41))
    history: list[dict[str, object]] = [
        {"created_by": "a"},
        {"created_by": "label", "empty_layer": True},
        {"created_by": "b"},
    ]
    layers = finalize_layers(history, ["sha256:1", "sha256:2"], [10, 20])
    assert layers == [
        {"diff_id": "sha256:1", "size": 10, "created_by": "a"},
        {"diff_id": "sha256:2", "size": 20, "created_by": "b"},
    ]
    assert finalize_layers([], ["sha256:1"], [1, 2])[0]["size"] is None


@pytest.mark.unit
def test_state_configs(tmp_path: Path) -> None:
    state = make_state_dir(root=tmp_path / "s")
    conf = state.containers_conf.read_text()
    assert 'runtime = "runc"' in conf
    assert 'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]' in conf
    assert f'graphroot = "{state.graphroot}"' in state.storage_conf.read_text()
    assert state.engine_env() == {
        "CONTAINERS_CONF": str(state.containers_conf),
        "CONTAINERS_STORAGE_CONF": str(state.storage_conf),
    }
    assert make_state_dir(root=tmp_path / "s") == state  # idempotent


# --- podman -------------------------------------------------------------------


@pytest.mark.container
def test_podman_version(podman: PodmanEngine) -> None:
    assert not needs_version(podman.version(), (4, 0))


@pytest.mark.container
def test_build_from_the_offline_base(podman: PodmanEngine, built: str, base_image: BaseImage) -> None:
    info = podman.inspect("localhost/kiln-test/engine:1")
    assert info["id"] == built
    assert info["created"].startswith("2025-01-01T00:00:00")
    assert info["labels"]["dev.kiln.test"] == "engine"
    assert info["layers"][0]["diff_id"] == f"sha256:{base_image.tarball_sha256}"
    assert len(info["layers"]) == 5  # base + 3 RUN + 1 COPY
    assert all(isinstance(layer["size"], int) for layer in info["layers"])
    assert "apt-get install" in info["layers"][1]["created_by"]


@pytest.mark.container
def test_cold_builds_give_the_same_digest(podman: PodmanEngine, built: str, context: Path) -> None:
    again = podman.build(
        context, context / "Containerfile", "localhost/kiln-test/engine:1b", {"VERSION": "1"}, EPOCH, no_cache=True
    )
    assert again == built


@pytest.mark.container
def test_cached_rebuild_is_quick_and_identical(podman: PodmanEngine, built: str, context: Path) -> None:
    start = time.monotonic()
    again = podman.build(context, context / "Containerfile", "localhost/kiln-test/engine:1c", {"VERSION": "1"}, EPOCH)
    assert again == built
    assert time.monotonic() - start < 30


@pytest.mark.container
def test_version_bump_changes_only_the_layers_after_the_arg(podman: PodmanEngine, built: str, context: Path) -> None:
    bumped = podman.build(context, context / "Containerfile", "localhost/kiln-test/engine:2", {"VERSION": "2"}, EPOCH)
    old = [layer["diff_id"] for layer in podman.inspect(built)["layers"]]
    new = [layer["diff_id"] for layer in podman.inspect(bumped)["layers"]]
    assert new[:-1] == old[:-1]
    assert new[-1] != old[-1]


@pytest.mark.container
def test_build_runs_with_kilns_ulimits(podman: PodmanEngine, built: str, test_state: StateDir) -> None:
    from builder.core.run import run

    out = run(["podman", "run", "--rm", built, "cat", "/etc/kiln-nofile"], env=test_state.engine_env(), capture=True)
    assert out.stdout.decode().strip() == "20000"


@pytest.mark.container
def test_exists_and_remove(podman: PodmanEngine, built: str, context: Path) -> None:
    assert podman.exists("localhost/kiln-test/engine:1")
    assert not podman.exists("localhost/kiln-test/engine:nope")
    podman.build(context, context / "Containerfile", "localhost/kiln-test/engine:rm", {"VERSION": "1"}, EPOCH)
    podman.remove("localhost/kiln-test/engine:rm")
    assert not podman.exists("localhost/kiln-test/engine:rm")
    assert podman.exists(built)  # removing a tag keeps the image it named


@pytest.mark.container
def test_failed_build_names_the_tool_and_shows_the_tail(
    podman: PodmanEngine, tmp_path: Path, base_image: BaseImage
) -> None:
    (tmp_path / "Containerfile").write_text(f"FROM {base_image.ref}\nRUN echo doomed-step >&2 && exit 3\n")
    with pytest.raises(BuildError) as err:
        podman.build(tmp_path, tmp_path / "Containerfile", "localhost/kiln-test/broken:1", None, EPOCH)
    assert "building localhost/kiln-test/broken:1: podman failed with exit code" in str(err.value)
    assert "doomed-step" in str(err.value)


@pytest.mark.container
def test_push_to_an_oci_layout_returns_the_manifest_digest(podman: PodmanEngine, built: str, tmp_path: Path) -> None:
    digest = podman.push(built, f"oci:{tmp_path / 'layout'}:1")
    index = json.loads((tmp_path / "layout" / "index.json").read_text())
    assert [m["digest"] for m in index["manifests"]] == [digest]


@pytest.mark.container
def test_push_to_a_registry(podman: PodmanEngine, built: str, registry: str) -> None:
    digest = podman.push(built, f"{registry}/kiln-test/engine:1", tls_verify=False)
    assert digest == podman.push(built, f"{registry}/kiln-test/engine:1-again", tls_verify=False)
    assert digest == manifest_digest(registry, "kiln-test/engine", "1")
    # The pushed manifest has compressed layers: its digest is not the local one.
    assert digest != podman.inspect(built)["digest"]


@pytest.mark.container
def test_podman_missing_is_a_clear_error(podman: PodmanEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissing, match=r"podman not found; install it with: apt-get install podman runc"):
        PodmanEngine(podman.state).version()


# --- docker SDK against a podman API socket -----------------------------------


@pytest.mark.container
def test_docker_engine_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    require_docker_sdk()
    with pytest.raises(ToolMissing, match="no Docker API at unix://"):
        DockerEngine(f"unix://{tmp_path / 'nothing.sock'}").version()


@pytest.mark.container
def test_docker_engine_builds_into_the_same_store(
    docker_engine: DockerEngine, podman: PodmanEngine, context: Path, base_image: BaseImage
) -> None:
    image_id = docker_engine.build(context, context / "Containerfile", "localhost/kiln-test/docker:1", {"VERSION": "1"})
    assert docker_engine.exists("localhost/kiln-test/docker:1")
    assert podman.inspect("localhost/kiln-test/docker:1")["id"] == image_id  # one store, two APIs
    info = docker_engine.inspect(image_id)
    assert info["labels"]["dev.kiln.test"] == "engine"
    assert info["layers"][0]["diff_id"] == f"sha256:{base_image.tarball_sha256}"
    assert len(info["layers"]) == 5
    assert not DockerEngine.reproducible  # no --timestamp over the Docker API


@pytest.mark.container
def test_docker_engine_pushes_what_podman_pushes(
    docker_engine: DockerEngine, podman: PodmanEngine, built: str, registry: str
) -> None:
    digest = docker_engine.push(built, f"{registry}/kiln-test/engine:docker", tls_verify=False)
    assert digest == podman.push(built, f"{registry}/kiln-test/engine:podman", tls_verify=False)


@pytest.mark.container
def test_docker_engine_build_failure(docker_engine: DockerEngine, tmp_path: Path, base_image: BaseImage) -> None:
    (tmp_path / "Containerfile").write_text(f"FROM {base_image.ref}\nRUN exit 7\n")
    with pytest.raises(BuildError, match="building localhost/kiln-test/docker-broken:1"):
        docker_engine.build(tmp_path, tmp_path / "Containerfile", "localhost/kiln-test/docker-broken:1")


@pytest.mark.container
@pytest.mark.parametrize("engine_name", ["podman", "docker"])
def test_load_a_docker_archive_keeps_the_config_digest(
    engine_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    engine: Engine = request.getfixturevalue("podman" if engine_name == "podman" else "docker_engine")
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size, info.mtime = 6, EPOCH
        tar.addfile(info, io.BytesIO(b"hello\n"))
    diff_id = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "created": "2025-01-01T00:00:00Z",
         "config": {"Labels": {"via": engine_name}}, "rootfs": {"type": "layers", "diff_ids": [diff_id]},
         "history": [{"created": "2025-01-01T00:00:00Z", "created_by": "test"}]},
        sort_keys=True,
    ).encode()  # fmt: skip
    ref = f"localhost/kiln-test/loaded:{engine_name}"
    write_docker_archive(tmp_path / "image.tar", ref, config, layer, EPOCH)
    engine.load(tmp_path / "image.tar")
    assert engine.inspect(ref)["id"] == "sha256:" + hashlib.sha256(config).hexdigest()
    engine.remove(ref)
