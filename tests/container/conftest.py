"""Fixtures shared by the container tier: one persistent test state dir (the base
is bootstrapped once and cached there), engines, and a registry on 127.0.0.1.

The state dir is `.kiln/test-state` (or `$KILN_TEST_STATE_DIR`), separate from
the CLI's `.kiln`, so tests never touch a user's images.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from builder.base.bootstrap import BaseImage, make_base
from builder.core.context import make_context
from builder.core.engine import DockerEngine, PodmanEngine, start_podman_service
from builder.core.state import StateDir, make_state_dir
from builder.release.registry import RegistryInfo, running_registry
from tests.conftest import IN_CI, require_tool
from tests.images import QEMU_BASE_MODULES, TEST_STATE


def require_docker_sdk() -> None:
    try:
        import docker  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("the docker Python package is not installed (CI=true: a failure, not a skip)")
        pytest.skip("the docker Python package is not installed")


@pytest.fixture(scope="session")
def test_state() -> StateDir:
    return make_state_dir(root=TEST_STATE)


@pytest.fixture(scope="session")
def base_image(test_state: StateDir) -> BaseImage:
    require_tool("mmdebstrap")
    require_tool("podman")
    return make_base(make_context(PodmanEngine(test_state), state=test_state), drop_modules=QEMU_BASE_MODULES)


@pytest.fixture(scope="session")
def podman(test_state: StateDir, base_image: BaseImage) -> PodmanEngine:
    engine = PodmanEngine(test_state)
    engine.version()
    return engine


@pytest.fixture(scope="session")
def registry_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryInfo]:
    """Debian's docker-registry (distribution) on 127.0.0.1, plain http, no auth."""
    require_tool("docker-registry")
    with running_registry(tmp_path_factory.mktemp("registry")) as info:
        yield info


@pytest.fixture(scope="session")
def registry(registry_info: RegistryInfo) -> str:
    return registry_info.address


@pytest.fixture(scope="session")
def docker_engine(
    test_state: StateDir, base_image: BaseImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerEngine]:
    require_docker_sdk()
    sock = tmp_path_factory.mktemp("svc") / "podman.sock"
    with start_podman_service(test_state, sock) as url:
        engine = DockerEngine(url)
        engine.version()
        yield engine


@pytest.fixture
def scratch_state(tmp_path: Path) -> Iterator[StateDir]:
    """A throwaway state dir (own store); removed afterwards: a base in it is ~1.2 GB."""
    state = make_state_dir(root=tmp_path / "state")
    yield state
    shutil.rmtree(state.root, ignore_errors=True)
    shutil.rmtree(state.runroot, ignore_errors=True)


@pytest.fixture
def path_only(tmp_path: Path) -> Iterator[Callable[..., None]]:
    """Set PATH to a directory holding only the named tools (links to the real ones)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    saved = os.environ["PATH"]

    def keep(*tools: str) -> None:
        for tool in tools:
            (bin_dir / tool).symlink_to(require_tool(tool))
        os.environ["PATH"] = str(bin_dir)

    yield keep
    os.environ["PATH"] = saved
