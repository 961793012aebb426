"""What this CPU offers onnxruntime's kernels: its instruction-set flags, and whether it has int8 dot products.

int8 speed depends on the instruction set: onnxruntime's int8 convolutions and matrix products gain over fp32
where the CPU has int8 dot-product instructions (AVX-512 VNNI and AMX were measured); with AVX2 alone the gain
varies by CPU (none on one machine, 1.6x for the UNet on another), so export/int8_probe.py measures it there.
docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sys

# Instruction-set flags that decide which onnxruntime kernels and graph layouts run (/proc/cpuinfo's names)
KERNEL_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "asimddp",
    "sve",
)
# int8 dot-product instructions, by the names Linux's /proc/cpuinfo gives them
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "asimddp", "i8mm")
# where int8-static was measured faster than fp32 end to end (docs/benchmarks.md); elsewhere it is unmeasured
INT8_MEASURED_FASTER = ("avx512_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags in /proc/cpuinfo's names; elsewhere what numpy detected (x86) or
    what every Apple silicon CPU has."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:  # not Linux
        pass
    if not flags:
        flags = _flags_from_numpy()
        if sys.platform == "darwin" and platform.machine() == "arm64":
            flags |= {"asimd", "asimddp"}  # every Apple silicon core has NEON dot products
    return frozenset(flags - cpuid_hidden())


@functools.lru_cache(maxsize=1)
def cpuid_hidden() -> frozenset[str]:
    """The flags a CPUID mask hides from this process's kernels (benchmarks/cpu_tier.py loads one to run a
    lesser CPU's kernels); empty without one. /proc/cpuinfo still lists them: the kernels do not see them."""
    if sys.platform != "linux":
        return frozenset()
    import ctypes

    try:
        hidden = ctypes.CDLL(None).edgediff_cpuid_hidden
    except (AttributeError, OSError):  # no mask loaded
        return frozenset()
    hidden.restype = ctypes.c_char_p
    return frozenset(filter(None, (hidden() or b"").decode().split(",")))


def _flags_from_numpy() -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as found
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as found
        except ImportError:
            return set()
    names = {
        "AVX2": "avx2",
        "FMA3": "fma",
        "AVX512F": "avx512f",
        "AVX512VNNI": "avx512_vnni",
        "AVX512BF16": "avx512_bf16",
        "ASIMD": "asimd",
        "ASIMDDP": "asimddp",
    }
    return {ours for theirs, ours in names.items() if found.get(theirs)}


def kernel_tag(flags: frozenset[str] | None = None) -> str:
    """Eight hex digits naming the kernel-deciding flags this CPU offers: graphs onnxruntime optimized for one set
    may fail on another (its channel-blocked layout is 16 channels wide with AVX-512, 8 with AVX2)."""
    flags = cpu_flags() if flags is None else flags
    return hashlib.sha1(" ".join(f for f in KERNEL_FLAGS if f in flags).encode()).hexdigest()[:8]


def int8_dot_product(flags: frozenset[str] | None = None) -> str | None:
    """The CPU's int8 dot-product instruction set (e.g. "avx512_vnni"), or None where it has none."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in INT8_DOT_FLAGS if f in flags), None)


def int8_is_faster(flags: frozenset[str] | None = None) -> bool:
    """True where int8-static bundles were measured faster than fp32 on the CPU provider."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in INT8_MEASURED_FASTER)
