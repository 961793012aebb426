"""Tiny random diffusers models and their exported bundles, built once per test session."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[tuple, Path] = {}


def tiny_source(arch: str, root: Path) -> Path:
    from edgediff.models.random_init import build_random_pipeline

    key = ("source", arch)
    if key not in _CACHE:
        _CACHE[key] = build_random_pipeline(arch, root / f"src-{arch}")
    return _CACHE[key]


# Families trained at another size than their UNet's sample_size (SDXL-Turbo: 512) are exported at the tiny
# models' own size, so that tests stay fast.
TINY_SIZE = {"tiny-sdxl-turbo": 64}


def tiny_bundle(arch: str, root: Path, precision: str = "fp32") -> Path:
    from edgediff.export import export_bundle

    key = (precision, arch)
    if key not in _CACHE:
        size = TINY_SIZE.get(arch)
        _CACHE[key] = export_bundle(str(tiny_source(arch, root)), root / f"bundle-{arch}-{precision}",
                                    precision=precision, progress=False, height=size, width=size)
    return _CACHE[key]
