"""Project copies for later releases of the same device: what the benchmarks and the tests build.

Each `make_*_project(dest)` copies the project (specs, models, overlays, and the
checkout's per-class keys, so the copy is a release of the same device) and
changes one thing; point Kiln at it with `project_dir(dest)` (KILN_PROJECT_DIR).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.common import ROOT
from builder.core import paths
from builder.core.state import StateDir
from builder.spec.loader import load_class

QEMU_CLASS = "qemu-x86_64"


@contextlib.contextmanager
def project_dir(path: Path | None) -> Iterator[Path]:
    """KILN_PROJECT_DIR=PATH for the block (None: the checkout itself); the old value comes back."""
    saved = os.environ.get("KILN_PROJECT_DIR")
    if path is not None:
        os.environ["KILN_PROJECT_DIR"] = str(path)
    try:
        yield path or ROOT
    finally:
        if saved is None:
            os.environ.pop("KILN_PROJECT_DIR", None)
        else:
            os.environ["KILN_PROJECT_DIR"] = saved


def copy_project(dest: Path, *, models_from: Path | None = None, cls: str = QEMU_CLASS) -> Path:
    """A copy of the project (specs, models, overlays, the dev SSH and release keys of CLS) to change and
    use as KILN_PROJECT_DIR: a later release of the same device. `models_from` (a project) also copies
    its optimized models and gate reports, so an unchanged model is reused byte for byte."""
    import shutil

    for name in ("images", "models", "overlays"):
        shutil.copytree(ROOT / name, dest / name, symlinks=True)
    # models fetched from a wheel (spec `fetch`): the files and the wheels, hard-linked, so a copy
    # never downloads them again (builder.model.fetch)
    for fetched in (".kiln/models", ".kiln/cache/model-wheels"):
        if (ROOT / fetched).is_dir():
            shutil.copytree(ROOT / fetched, dest / fetched, copy_function=_link_or_copy)
    # the same per-checkout keys: a release of the same device
    for keys in (lambda: paths.ssh_key_path(cls).parent, lambda: paths.dev_signing_key_dir(cls)):
        src, out = in_project(ROOT, keys), in_project(dest, keys)
        if src.is_dir():
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("S.*"))  # gpg-agent sockets
    if models_from is not None:
        src, out = (in_project(p, lambda: paths.class_dir(cls) / "models") for p in (models_from, dest))
        if src.is_dir():
            shutil.copytree(src, out)
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    import shutil

    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


def in_project(project: Path, where: Callable[[], Path]) -> Path:
    """A builder.core.paths location (`where`) as it is in PROJECT (KILN_PROJECT_DIR for the call)."""
    with project_dir(project):
        return where()


def make_retrained_project(dest: Path, note: str = "retrained: new weights, same graph", *,
                           cls: str = QEMU_CLASS) -> Path:
    """A project copy whose digits model has new bytes but the same behaviour: a model-only release."""
    import onnx

    copy_project(dest, models_from=ROOT, cls=cls)
    model_file = dest / "models/digits/digits.onnx"
    proto = onnx.load(model_file)
    proto.doc_string = note
    onnx.save(proto, model_file)
    return dest


def make_widened_project(dest: Path, hidden: int = 8192, *, cls: str = QEMU_CLASS) -> Path:
    """A project copy whose digits model carries megabytes of weights and gives the same answers: its
    hidden layer widened from 32 to HIDDEN units, the new units' input weights random (seed 0, the
    spread of the trained ones: they do not compress) and their output weights zero. A model-only
    release of realistic size: 8 MiB of FP32 weights at 8192, which the gates ship as INT8 (about
    2 MiB). The class's size gate is raised to match."""
    import numpy as np
    import onnx
    import yaml
    from onnx import numpy_helper

    copy_project(dest, models_from=ROOT, cls=cls)
    model_file = dest / "models/digits/digits.onnx"
    proto = onnx.load(model_file)
    inits = {init.name: init for init in proto.graph.initializer}
    w1, b1, w2 = (numpy_helper.to_array(inits[name]) for name in ("head.1.weight", "head.1.bias", "head.3.weight"))
    extra = hidden - w1.shape[0]
    rng = np.random.default_rng(0)
    grown = {
        "head.1.weight": np.concatenate([w1, rng.normal(0, w1.std(), (extra, w1.shape[1])).astype(w1.dtype)]),
        "head.1.bias": np.concatenate([b1, np.zeros(extra, b1.dtype)]),
        "head.3.weight": np.concatenate([w2, np.zeros((w2.shape[0], extra), w2.dtype)], axis=1),
    }
    for name, value in grown.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    proto.doc_string = f"widened: {hidden} hidden units, the added ones silent"
    onnx.checker.check_model(proto)
    onnx.save(proto, model_file)
    # the class's size gate (1 MiB, for the small net) raised as a release engineer shipping it would
    spec_file = dest / "images" / f"{cls}.yaml"
    doc = yaml.safe_load(spec_file.read_text())
    (digits,) = [m for m in doc["spec"]["models"] if m["name"] == "digits"]
    digits["gates"]["maxSize"] = "32MiB"
    spec_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def make_package_project(dest: Path, package: str = "jq", *, cls: str = QEMU_CLASS) -> Path:
    """A project copy whose class installs one more Debian package, model unchanged: an OS update."""
    import yaml

    copy_project(dest, models_from=ROOT, cls=cls)
    spec_file = dest / "images" / f"{cls}.yaml"
    doc = yaml.safe_load(spec_file.read_text())
    doc["spec"]["packages"].append(package)
    spec_file.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


def make_broken_golden_project(dest: Path, *, cls: str = QEMU_CLASS, state: StateDir | None = None) -> Path:
    """A project copy whose model ships with wrong golden outputs: the device's golden check fails.
    `state`: the store the gate may build in (an arm64 class's gate runs in an image there)."""
    import numpy as np

    from builder.model.for_class import make_optimized_models

    make_retrained_project(dest, note="broken golden set", cls=cls)
    with project_dir(dest):  # optimize, then replace the golden outputs with wrong ones
        make_optimized_models(load_class(cls, dest / "images"), source=f"images/{cls}.yaml", state=state)
    for golden in in_project(dest, lambda: paths.class_dir(cls) / "models").glob("digits/*/golden.npz"):
        data = dict(np.load(golden))
        data["outputs"] = data["outputs"][:, ::-1].copy()
        np.savez(golden, **data)
    return dest
