"""Finding bundles: an explicit folder, or a name in the per-user models folder, or a shipped model.

The models folder is platformdirs' per-user data folder (e.g. ~/.local/share/edgediff/models on
Linux, ~/Library/Application Support/edgediff/models on macOS, %LOCALAPPDATA%\\edgediff\\models on
Windows); EDGEDIFF_MODELS_DIR overrides it. An app copies or exports bundles there, and finds them
by folder name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .bundle import folder_size
from .errors import BundleError, EdgediffError
from .manifest import MANIFEST_NAME, Manifest

MODELS_DIR_ENV = "EDGEDIFF_MODELS_DIR"


def models_dir() -> Path:
    override = os.environ.get(MODELS_DIR_ENV)
    if override:
        return Path(override)
    from platformdirs import user_data_path

    return user_data_path("edgediff", appauthor=False) / "models"


def shipped_bundle(name: str | None = None) -> Path:
    """A shipped model's bundle (models/shipped.py; None: the default one)."""
    from edgediff.models.shipped import shipped_bundle

    return shipped_bundle(name)


def _shipped_models() -> dict:
    from edgediff.models.shipped import SHIPPED_MODELS

    return SHIPPED_MODELS


@dataclass
class BundleEntry:
    name: str
    path: Path
    manifest: Manifest | None  # None when the folder is not a readable bundle
    problem: str = ""  # why it is not, in one line

    @property
    def size(self) -> int:
        return folder_size(self.path)


def _entry(name: str, path: Path) -> BundleEntry:
    try:
        return BundleEntry(name, path, Manifest.load(path))
    except EdgediffError as exc:
        return BundleEntry(name, path, None, str(exc))


def list_bundles(folder: Path | None = None) -> list[BundleEntry]:
    """The shipped bundles (the default first), then every sub-folder of the models folder that has a
    manifest.json (manifests are read, not checksummed: opening a bundle verifies it)."""
    entries = [_entry(name, model.bundle) for name, model in _shipped_models().items()]
    folder = models_dir() if folder is None else folder
    if folder.is_dir():
        entries += [_entry(p.name, p) for p in sorted(folder.iterdir()) if (p / MANIFEST_NAME).is_file()]
    return entries


def resolve_bundle(model: str | Path | None) -> Path:
    """A bundle path from a folder path, a name in the models folder, a shipped model's name, or None for the
    default shipped model."""
    if model is None:
        return shipped_bundle()
    if str(model) in _shipped_models():
        return shipped_bundle(str(model))
    path = Path(model)
    if path.is_dir() or path.name != str(model):  # a path (opening it says what is wrong with it)
        return path
    named = models_dir() / str(model)
    if named.is_dir():
        return named
    raise BundleError("model_not_found", name=str(model), folder=models_dir())
