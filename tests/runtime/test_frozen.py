"""The frozen executable: built with PyInstaller, run with an empty environment, draws the shipped model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from training import checker

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_frozen_executable_draws_the_shipped_model(tmp_path):
    pytest.importorskip("PyInstaller")
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "packaging" / "freeze.py"),
            "--dist",
            str(tmp_path / "dist"),
            "--work",
            str(tmp_path / "work"),
        ],
        check=True,
        capture_output=True,
    )
    exe = tmp_path / "dist" / "edgediff" / "edgediff"
    out = tmp_path / "out.png"
    # no PATH to a Python, no PYTHONPATH, no virtual environment: only what the folder holds
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}
    result = subprocess.run(
        [str(exe), "generate", "a large red circle on a blue background", "--seed", "0", "-o", str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    from PIL import Image

    reading = checker.read(Image.open(out))
    assert (reading.colour, reading.background) == ("red", "blue")
    listing = subprocess.run([str(exe), "list"], env=env, capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "shipped" in listing.stdout
    export = subprocess.run(
        [str(exe), "export", "x", str(tmp_path / "b")], env=env, capture_output=True, text=True, timeout=120
    )
    assert export.returncode == 1 and "edgediff[cpu,export]" in export.stderr  # no torch inside: says so, one line
