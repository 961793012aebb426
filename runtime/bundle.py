"""Opening a bundle: the manifest, then every file it names, checked before anything is run.

A bundle is data. Paths come only from the manifest and must be plain names inside the folder
(symlinks that leave it are refused); onnxruntime itself refuses external data outside the folder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, ChecksumError
from .manifest import TOKENIZER_NAME, Manifest

VERIFY_MODES = ("full", "size", "none")  # full = sizes and sha256; size = sizes only (fast start)
_HASH_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def folder_size(path: Path) -> int:
    """Bytes of every file under `path` (Core ML packages are folders)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


@dataclass
class Bundle:
    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, verify: str = "full") -> "Bundle":
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        root = Path(path)
        if not root.is_dir():
            raise BundleError("bundle_not_found", path=root)
        bundle = cls(root, Manifest.load(root))
        bundle._check_files(verify)
        return bundle

    def file(self, name: str) -> Path:
        """The path of a file the manifest names, refusing anything that leaves the bundle folder."""
        rel = Path(name)
        # relative, no "..", and still inside once symlinks are followed (Core ML packages are folders)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise BundleError("file_outside", path=self.path, file=name)
        candidate = self.path / rel
        if not candidate.resolve().is_relative_to(self.path.resolve()):
            raise BundleError("file_outside", path=self.path, file=name)
        if not candidate.is_file():
            raise BundleError("file_missing", path=self.path, file=name)
        return candidate

    def component_path(self, component: str) -> Path:
        """The graph file (ONNX), or the package folder (Core ML: the first part of its files' paths)."""
        path = self.file(self.manifest.components[component].graph_file)
        if self.manifest.target == "coreml":
            return self.path / Path(self.manifest.components[component].graph_file).parts[0]
        return path

    def tokenizer_file(self, entry: dict) -> Path:
        """A tokenizer entry's file (the manifest's `tokenizer`, or one text encoder's in `conditioning`)."""
        return self.file(entry.get("file", TOKENIZER_NAME))

    @property
    def size_on_disk(self) -> int:
        return folder_size(self.path)

    def _check_files(self, verify: str) -> None:
        for encoder in self.manifest.text_encoders:  # raises when a tokenizer is missing
            self.tokenizer_file(encoder["tokenizer"])
        if verify == "none":
            return
        files = [item for spec in self.manifest.components.values() for item in spec.files.items()]
        prefix = self.manifest.conditioning.get("prefix")  # SANA's cached instruction prefix (denoisers/sana.py)
        if prefix:
            files.append((prefix["file"], prefix))
        for name, meta in files:
            path = self.file(name)
            size = path.stat().st_size
            if size != meta["size"]:
                raise BundleError("file_size", path=self.path, file=name, found=size, expected=meta["size"])
            if verify == "full":
                digest = sha256_file(path)
                if digest != meta["sha256"]:
                    raise ChecksumError(
                        "checksum", path=self.path, file=name, found=digest[:12], expected=meta["sha256"][:12]
                    )
