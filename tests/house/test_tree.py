"""Rules of the tree itself: no development history or machine paths in tracked files, and package
dependencies that run one way (cli -> export, benchmarks -> runtime; training outside the package)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# history belongs in git; an absolute path of one machine means nothing on another
# (the machine path is spelled in two pieces so that this file does not match itself)
FORBIDDEN = re.compile(r"session [0-9]|" + "/wo" + r"rk/|issue [0-9]", re.IGNORECASE)
# package folder -> edgediff packages it must never import
MUST_NOT_IMPORT = {
    "runtime": {"export", "benchmarks", "cli", "training"},
    "export": {"benchmarks", "cli", "training"},
    # the quality benchmark scores the shipped model's images with training/'s checker, lazily and only
    # from a source checkout (training/ is not installed)
    "benchmarks": {"cli"},
    "models": {"export", "benchmarks", "cli", "training"},
    "server": {"export", "benchmarks", "cli", "training"},
}


def _tracked_text_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = []
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file():
            continue
        head = path.read_bytes()[:8192]
        if b"\0" in head:  # binary: weights, images, graphs
            continue
        files.append(path)
    return files


def test_tracked_files_carry_no_history_or_machine_paths():
    hits = []
    for path in _tracked_text_files():
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "history or machine paths in tracked files:\n" + "\n".join(hits)


def _edgediff_imports(path: Path, package: str) -> set[str]:
    """The top-level edgediff packages (and `training`) a module imports, including relative imports
    that climb out of its own package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level >= 2:  # `from ..x import y` inside edgediff.<package>.<sub>
                depth = len(path.relative_to(ROOT / package).parts) - 1
                if node.level > depth:
                    found.add((node.module or "").split(".")[0] or "?")
                continue
            names = [node.module or ""] if node.level == 0 else []
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "edgediff" and len(parts) > 1:
                found.add(parts[1])
            elif parts[0] == "training":
                found.add("training")
    return found


@pytest.mark.parametrize("package", sorted(MUST_NOT_IMPORT))
def test_imports_run_one_way(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        wrong = _edgediff_imports(path, package) & MUST_NOT_IMPORT[package]
        if wrong:
            bad[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not bad, f"{package}/ imports what it must not: {bad}"


def test_the_import_check_sees_a_backwards_import(tmp_path, monkeypatch):
    module = ROOT / "runtime" / "_probe_backwards.py"
    module.write_text("from edgediff.export import export_bundle\nimport edgediff.benchmarks.harness\n")
    try:
        assert _edgediff_imports(module, "runtime") == {"export", "benchmarks"}
    finally:
        module.unlink()
