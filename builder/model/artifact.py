"""A model as an image bakes it: what the gate chose (or the source model), for the build context."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln_device import contract


@dataclass(frozen=True)
class ModelArtifact:
    """One model as it is baked: a file, its digest and precision."""

    name: str
    version: str
    precision: str
    path: Path
    sha256: str
    extra_files: tuple[Path, ...] = ()

    @property
    def image_dir(self) -> str:
        return f"{contract.MODELS_DIR}/{self.name}/{self.version}"
