"""The staged output folder every target writes into: an export is whole at `out`, or absent."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgediff.runtime.errors import ExportError


@contextmanager
def staged(out: Path, overwrite: bool):
    """A temporary folder beside `out` that becomes `out` when the block finishes, and vanishes if it
    fails or is interrupted."""
    if out.exists() and not overwrite:
        raise ExportError("export_exists", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _commit(staging: Path, out: Path) -> None:
    """Moves the finished bundle into place; an old bundle is replaced only once the new one is whole."""
    staging.chmod(0o755)  # mkdtemp (and onnx's external-data writer) make files private; a bundle is shared data
    for f in staging.rglob("*"):  # (Core ML packages are folders)
        f.chmod(0o755 if f.is_dir() else 0o644)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
