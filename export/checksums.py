"""The bundle's checksums, read on a thread of their own while the export goes on.

An export runs on one core most of the time (PyTorch's tracing, onnx's serialisation, opening a graph to check it),
and reading a bundle's files through sha256 took 5.8 s of full-size SD-Turbo's 72 s fp32 export on 2 cores. Each
file's checksum starts once the file is final (written and not to be replaced) and is read on a second core while
the export checks that graph and exports the next; the manifest takes it at the end. A file changed since its checksum
started (another inode, size or modification time) is read again then.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from edgediff.runtime.bundle import sha256_file


def _stamp(path: Path) -> tuple[int, int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


class BackgroundChecksums:
    """sha256 of files in one folder, each started by `start` and taken by `fill` (a context manager: its thread
    stops on exit, a checksum under way finishing first)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgediff-sha256")
        self._started: dict[str, tuple[tuple[int, int, int], Future]] = {}

    def __enter__(self) -> "BackgroundChecksums":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def start(self, names) -> None:
        """Starts the checksums of these files of the folder (final: written, not to be replaced)."""
        for name in names:
            path = self.folder / name
            self._started[name] = (_stamp(path), self._pool.submit(sha256_file, path))

    def checksum(self, name: str) -> str:
        """The file's sha256: the one started for it where the file has not changed since, else read now."""
        stamp, future = self._started.pop(name, (None, None))
        path = self.folder / name
        if future is not None and stamp == _stamp(path):
            return future.result()
        return sha256_file(path)

    def fill(self, manifest) -> None:
        """Gives every file of the manifest's components that has no checksum its checksum."""
        for spec in manifest.components.values():
            for name, record in spec.files.items():
                if "sha256" not in record:
                    record["sha256"] = self.checksum(name)
