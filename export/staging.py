"""The staged output folder every target writes into: an export is whole at `out`, or absent.

A process killed outright (out of memory, SIGKILL) cannot remove its staging folder: each one records its owner,
and the next export to the same place removes those whose owner is gone.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from edgediff.runtime.errors import ExportError

log = logging.getLogger("edgediff.export")
OWNER_FILE = ".owner"  # in a staging folder: "<pid> <process start>" of the export writing it


@contextmanager
def staged(out: Path, overwrite: bool):
    """A temporary folder beside `out` that becomes `out` when the block finishes, and vanishes if it
    fails or is interrupted."""
    if out.exists() and not overwrite:
        raise ExportError("export_exists", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    (staging / OWNER_FILE).write_text(_identity(os.getpid()) or "")
    try:
        yield staging
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _identity(pid: int) -> str | None:
    """ "<pid> <start>" for a running process (its start tells it from a later process given the same pid), None
    where it is not running or this platform does not say."""
    try:  # Linux: the start time, in clock ticks since boot, is /proc/<pid>/stat's 22nd field
        stat = Path(f"/proc/{pid}/stat").read_text()
        return f"{pid} {stat.rsplit(')', 1)[1].split()[19]}"
    except (OSError, IndexError):
        pass
    try:
        import psutil  # optional (the bench extra)

        return f"{pid} {psutil.Process(pid).create_time()}"
    except ImportError:
        return None
    except Exception:  # psutil.NoSuchProcess and its kin: not running
        return None


def _remove_orphans(out: Path) -> None:
    """Removes staging folders for `out` whose export is no longer running (killed before it could clean up)."""
    for folder in out.parent.glob(f".{out.name}.partial-*"):
        try:
            owner = (folder / OWNER_FILE).read_text().strip()
        except OSError:
            continue  # not ours, or still being created: left alone
        pid = owner.split(" ", 1)[0]
        if owner and pid.isdigit() and _identity(int(pid)) != owner:
            log.warning("removing %s: a half-written export whose process (%s) was killed", folder, pid)
            shutil.rmtree(folder, ignore_errors=True)


def _commit(staging: Path, out: Path) -> None:
    """Moves the finished bundle into place; an old bundle is replaced only once the new one is whole."""
    (staging / OWNER_FILE).unlink(missing_ok=True)
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
