"""Builds a one-folder `edgediff` executable with PyInstaller: the runtime, onnxruntime (CPU), the CLI
and the shipped bundle, with no Python needed beside it.

    pip install -c constraints.txt -e ".[cpu,freeze]"
    python packaging/freeze.py [--dist dist] [--work build/freeze]
    dist/edgediff/edgediff generate "a large red circle on a blue background" -o out.png

The export and benchmark commands need PyTorch, which is left out (they say so if called). The
repository maps top-level folders into the `edgediff` namespace at install time, which PyInstaller's
import analysis cannot follow through an editable install, so the torch-free packages are first
copied into a staging tree laid out as `edgediff/...`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch-free: what `edgediff generate/list/info` needs, and export's tables (`edgediff families`, the export
# command's choices), whose modules import PyTorch only inside the functions that export
FROZEN_PACKAGES = ("runtime", "cli", "models", "export")
# Heavy stacks that only export/benchmarks/training use; excluded so an environment that has them stays lean
# (`training` is not installed, but a build from the repository root could otherwise find it).
EXCLUDED = (
    "torch",
    "diffusers",
    "transformers",
    "optimum",
    "onnx",
    "safetensors",
    "accelerate",
    "peft",
    "coremltools",
    "sklearn",
    "matplotlib",
    "edgediff.benchmarks",
    "edgediff.models.random_init",
    "edgediff.models.tokenizer_build",
    "training",
    "tkinter",
    "PySide6",
    "IPython",
    "pytest",
    "scipy",
    "pandas",
    "sympy",
)


def stage_sources(staging: Path) -> Path:
    """edgediff/<package> copies of the frozen packages (without their Python caches)."""
    if staging.exists():
        shutil.rmtree(staging)
    pkg = staging / "edgediff"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""edgediff (frozen)."""\n')
    for name in FROZEN_PACKAGES:
        shutil.copytree(ROOT / name, pkg / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return staging


def build(dist: Path, work: Path) -> Path:
    import PyInstaller.__main__

    staging = stage_sources(work / "src")
    shipped = staging / "edgediff" / "models" / "shipped"
    args = [
        str(ROOT / "packaging" / "entry.py"),
        "--name",
        "edgediff",
        "--onedir",
        "--noconfirm",
        "--clean",
        "--distpath",
        str(dist),
        "--workpath",
        str(work / "pyinstaller"),
        "--specpath",
        str(work),
        "--paths",
        str(staging),
        "--collect-submodules",
        "edgediff",
        "--collect-binaries",
        "onnxruntime",
        "--collect-data",
        "onnxruntime",
        # the shipped bundle only: the diffusers weights and tiny decoder source are for export
        "--add-data",
        f"{shipped / 'bundle-fp32'}:edgediff/models/shipped/bundle-fp32",
        *[a for m in EXCLUDED for a in ("--exclude-module", m)],
    ]
    PyInstaller.__main__.run(args)
    return dist / "edgediff"


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", type=Path, default=ROOT / "dist")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "freeze")
    args = parser.parse_args()
    out = build(args.dist, args.work)
    print(f"{out} ({folder_size(out) / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
