"""Staged exports: a killed export's half-written folder is removed by the next export to the same place; a
running export's folder is not."""

import os
import signal
import subprocess
import sys

import pytest

from edgediff.export.staging import OWNER_FILE, _identity, staged

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")

HOLD = """
import sys, time
from pathlib import Path
from edgediff.export.staging import staged
with staged(Path(sys.argv[1]), overwrite=False) as folder:
    (folder / "half.onnx").write_bytes(b"x")
    print("staged", flush=True)
    time.sleep(60)
"""


def test_a_killed_exports_folder_goes_with_the_next_export(tmp_path):
    out = tmp_path / "bundle"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    os.kill(proc.pid, signal.SIGKILL)  # as the out-of-memory killer does: no clean-up runs
    proc.wait()
    (left,) = tmp_path.glob(".bundle.partial-*")
    assert (left / "half.onnx").exists()
    other = tmp_path / ".other.partial-x"  # another destination's: not this export's business
    other.mkdir()
    (other / OWNER_FILE).write_text(f"{proc.pid} 0")
    with staged(out, overwrite=False) as folder:
        (folder / "manifest.json").write_text("{}")
    assert not left.exists() and other.exists()
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"]  # the owner record is not in the bundle


def test_a_running_exports_folder_is_left_alone(tmp_path):
    out = tmp_path / "bundle"
    running = tmp_path / ".bundle.partial-running"
    running.mkdir()
    (running / OWNER_FILE).write_text(_identity(os.getpid()))
    unowned = tmp_path / ".bundle.partial-unowned"  # no owner record (an older version's): never guessed at
    unowned.mkdir()
    with staged(out, overwrite=False) as folder:
        (folder / "manifest.json").write_text("{}")
    assert running.exists() and unowned.exists()


def test_a_reused_pid_does_not_pass_for_the_killed_owner(tmp_path):
    out = tmp_path / "bundle"
    stale = tmp_path / ".bundle.partial-stale"
    stale.mkdir()
    pid, start = _identity(os.getpid()).split(" ", 1)
    (stale / OWNER_FILE).write_text(f"{pid} {start}0")  # this pid, but another process's start
    with staged(out, overwrite=False):
        pass
    assert not stale.exists()


def test_checksums_read_in_the_background_are_those_of_the_files_as_they_end_up(tmp_path, monkeypatch):
    """A bundle's checksums are read on a thread of their own from when each file is written
    (export/checksums.py): a file unchanged since gets the checksum read then, one rewritten or replaced after is
    read again, and a file never started is read when the manifest takes the checksums."""
    import hashlib
    from types import SimpleNamespace

    from edgediff.export import checksums

    for name in ("kept.onnx", "rewritten.onnx", "replaced.onnx", "late.onnx"):
        (tmp_path / name).write_bytes(name.encode() * 1000)
    reads, real = [], checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: reads.append(path.name) or real(path))
    with checksums.BackgroundChecksums(tmp_path) as background:
        background.start(["kept.onnx", "rewritten.onnx", "replaced.onnx"])
        # read before the changes below: a checksum still queued when the thread stops is cancelled, not read
        background.wait(["kept.onnx", "rewritten.onnx", "replaced.onnx"])
        (tmp_path / "rewritten.onnx").write_bytes(b"other bytes")
        (tmp_path / "new.onnx").write_bytes(b"a quantised graph")
        (tmp_path / "new.onnx").replace(tmp_path / "replaced.onnx")
        files = {name: {"size": 0} for name in ("kept.onnx", "rewritten.onnx", "replaced.onnx", "late.onnx")}
        background.fill(SimpleNamespace(components={"unet": SimpleNamespace(files=files)}))
    for name, record in files.items():
        assert record["sha256"] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(), name
    assert reads.count("kept.onnx") == 1  # the background read stood
    assert reads.count("rewritten.onnx") == 2 and reads.count("late.onnx") == 1


def test_checksums_started_before_a_move_stand_and_are_not_read_twice(tmp_path, monkeypatch):
    """A quantised graph's checksum starts where the graph is checked (checksums.BackgroundChecksums.start's
    `where`) and stands once the file is moved into the bundle unchanged; starting a file already started as it is
    reads nothing more, and one written again in its place is read again."""
    import hashlib
    from types import SimpleNamespace

    from edgediff.export import checksums

    bundle, work = tmp_path / "bundle", tmp_path / "work"
    bundle.mkdir()
    work.mkdir()
    (work / "unet.onnx.data").write_bytes(b"int8 weights" * 1000)
    (work / "unet.onnx").write_bytes(b"a candidate")
    reads, real = [], checksums.sha256_file
    monkeypatch.setattr(checksums, "sha256_file", lambda path: reads.append(path) or real(path))
    with checksums.BackgroundChecksums(bundle) as background:
        background.start(["unet.onnx.data", "unet.onnx"], where=work)
        background.wait(["unet.onnx.data", "unet.onnx"])
        (work / "unet.onnx.data").replace(bundle / "unet.onnx.data")
        (work / "unet.onnx").unlink()  # that candidate failed its check: another one takes its name
        (bundle / "unet.onnx").write_bytes(b"the graph kept")
        background.start(["unet.onnx.data", "unet.onnx"])  # as the bundle places them
        files = {"unet.onnx": {"size": 0}, "unet.onnx.data": {"size": 0}}
        background.fill(SimpleNamespace(components={"unet": SimpleNamespace(files=files)}))
    for name, record in files.items():
        assert record["sha256"] == hashlib.sha256((bundle / name).read_bytes()).hexdigest(), name
    assert reads == [work / "unet.onnx.data", work / "unet.onnx", bundle / "unet.onnx"]
