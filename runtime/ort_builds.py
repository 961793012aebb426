"""Which onnxruntime builds are installed.

Every build (onnxruntime, onnxruntime-gpu, onnxruntime-directml, ...) installs the same `onnxruntime` package
folder, so two of them overwrite each other's files and the one written last decides which providers exist.
Checked here: with onnxruntime and onnxruntime-webgpu both installed, only the CPU provider was offered. That is
why edgediff's runtime depends on no build itself and each extra (`edgediff[cpu]`, `edgediff[cuda]`, ...)
brings one; this module finds a second one that got in anyway and says how to get back to one.

A build is told by what it installs (the `onnxruntime/` folder), not by its name: onnxruntime-qnn 2 is a plugin
(its own `onnxruntime_qnn` folder, beside the CPU build it depends on), where 1.x was a build.
"""

from __future__ import annotations

import functools
from importlib import metadata

# the edgediff extra that installs each build (pyproject.toml); onnxruntime-qnn 1.x was a build, 2.x is a plugin
BUILDS = {
    "onnxruntime": "cpu",
    "onnxruntime-gpu": "cuda",
    "onnxruntime-directml": "directml",
    "onnxruntime-openvino": "openvino",
    "onnxruntime-qnn": "qnn",
    "onnxruntime-webgpu": "webgpu",
    "onnxruntime-migraphx": "migraphx",
    "onnxruntime-rocm": "rocm",
}


@functools.lru_cache(maxsize=1)  # read at each resolve; what is installed does not change under a running process
def installed() -> dict[str, str]:
    """The builds installed in this environment (distributions that install the `onnxruntime` folder), with their
    versions."""
    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("onnxruntime", "ort-nightly")) and _installs_onnxruntime(dist):
            found[name] = dist.version
    return found


def _installs_onnxruntime(dist: metadata.Distribution) -> bool:
    return any(f.parts[:1] == ("onnxruntime",) for f in dist.files or ())


def describe(builds: dict[str, str]) -> str:
    return ", ".join(f"{name} {version}" for name, version in builds.items())


def one_build(builds: dict[str, str], extra: str) -> str:
    """The commands that leave only the build of `extra` installed."""
    return f'pip uninstall -y {" ".join(builds)} && pip install "edgediff[{extra}]"'


def clash() -> str | None:
    """A warning when more than one build is installed, naming the commands that leave one; else None."""
    builds = installed()
    if len(builds) < 2:
        return None
    return (
        f"{len(builds)} onnxruntime builds are installed ({describe(builds)}) and overwrite each other's files, "
        f"so providers may be missing; keep one: {one_build(builds, likely_extra(builds))}"
    )


def likely_extra(builds: dict[str, str]) -> str:
    """The extra a user with these builds most likely wants: the accelerator one they added over the CPU build."""
    return next((BUILDS[name] for name in builds if BUILDS.get(name, "cpu") != "cpu"), "cpu")


def missing_message() -> str:
    others = ", ".join(f'"edgediff[{extra}]"' for extra in BUILDS.values() if extra != "cpu")
    return (
        f'edgediff needs an onnxruntime build: pip install "edgediff[cpu]" (on a Mac it has Core ML too), or one '
        f'for a GPU or NPU: {others} (README, "Platforms and execution providers")'
    )
