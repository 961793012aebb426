"""The bundle's checksums, read on a thread of their own while the export goes on.

An export runs on one core most of the time (PyTorch's tracing, onnx's serialisation, opening a graph to check it),
and reading a bundle's files through sha256 took 5.8 s of full-size SD-Turbo's 72 s fp32 export on 2 cores. Each
file's checksum starts once the file is final (written and not to be replaced) and is read on a second core while
the export checks that graph and exports the next; the manifest takes it at the end. A quantised graph's starts where
it lies when its final check begins, while onnxruntime opens it on one core, and stands if that graph is moved into
the bundle unchanged (a rename keeps the file). A file changed since its checksum started (another inode, size or
modification time) is read again then.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
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

    def start(self, names, where: Path | None = None) -> None:
        """Starts the checksums of these files of the folder (final: written, not to be replaced). `where`: the
        folder they lie in now, to be moved into this one unchanged under the same names (a quantised graph before
        its final check: a rename keeps the stamp, so the checksum stands); `wait` before moving them."""
        for name in names:
            path = Path(where or self.folder) / name
            stamp = _stamp(path)
            if self._started.get(name, (None,))[0] != stamp:  # not already started on this file as it is
                self._started[name] = (stamp, self._pool.submit(sha256_file, path))

    def wait(self, names) -> None:
        """Waits until the checksums of these files are read (or fail), before they are moved or removed: Windows
        refuses to rename or unlink a file another thread has open."""
        wait([self._started[name][1] for name in names if name in self._started])

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


class NoChecksums:
    """Checksums that start nothing (a graph quantised outside a bundle being written)."""

    def start(self, names, where: Path | None = None) -> None:
        pass

    def wait(self, names) -> None:
        pass
