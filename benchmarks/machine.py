"""What machine a benchmark ran on: CPU model and instruction sets, cores, memory, OS, runtimes, GPU; and the
theoretical MatMul peak its instruction set allows (theoretical_peak)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from edgediff.runtime.cpu_features import KERNEL_FLAGS as ISA_FLAGS  # the flags records list
from edgediff.runtime.cpu_features import cpuid_hidden


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:  # not Linux: keep platform's answer
        pass
    return model, flags


def cpu_clock() -> tuple[float, str] | None:
    """The CPU's highest clock this machine reports, in GHz, and where it was read; None when none can be.
    The highest of the three: a VM often shows only the nominal clock, which turbo exceeds."""
    found: list[tuple[float, str]] = []
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        found.append((int(khz) / 1e6, "cpufreq maximum"))
    except (OSError, ValueError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, re.MULTILINE)]
    if mhz:
        found.append((max(mhz) / 1000, "cpu MHz in /proc/cpuinfo"))
    named = re.search(r"@\s*([0-9.]+)\s*GHz", _cpuinfo()[0])
    if named:
        found.append((float(named.group(1)), "the model name"))
    return max(found) if found else None


# What each instruction set does per core and cycle at most: FMA units x lanes x MACs per lane. The unit count
# is the most any core of that architecture has (2 on x86, 4 on Apple's ARM cores), so the figure is a
# ceiling: cores with fewer units, or that split wide vectors in two, stay below it.
_FMA_UNITS = {"x86": 2, "arm": 4}
_AMX_INT8_MACS = 1024  # one AMX tile multiply per core and cycle (Sapphire Rapids: 2048 int8 ops)


def _isa_rate(dtype: str, flags: set[str], arch: str) -> tuple[str, int, int, int] | None:
    """(instruction set, FMA units, lanes, MACs per lane per unit and cycle) for `dtype`, or None."""
    units = _FMA_UNITS[arch]
    if arch == "arm":
        if dtype == "float32":
            return ("asimd", units, 4, 1) if "asimd" in flags else None
        if "i8mm" in flags:  # SMMLA: a 2x8 by 8x2 int8 product per 128-bit instruction
            return ("i8mm", units, 4, 8)
        return ("asimddp", units, 4, 4) if "asimddp" in flags else ("asimd", units, 8, 1) if "asimd" in flags else None
    wide = "avx512f" in flags
    if dtype == "float32":
        if wide:
            return ("avx512f", units, 16, 1)
        if "avx2" in flags or "avx" in flags:
            return ("avx2" if "avx2" in flags else "avx", units, 8, 1)
        return ("sse", units, 4, 1)
    if "amx_int8" in flags:
        return ("amx_int8", 1, _AMX_INT8_MACS, 1)
    if wide and "avx512_vnni" in flags:  # VPDPBUSD: 4 u8 x s8 products per 32-bit lane
        return ("avx512_vnni", units, 16, 4)
    if "avx_vnni" in flags:
        return ("avx_vnni", units, 8, 4)
    # without VNNI: VPMADDUBSW's u8 x s8 pairs per byte lane; the ceiling of that route (its widening adds,
    # in further instructions, keep real kernels well below it)
    if wide and "avx512bw" in flags:
        return ("avx512bw", units, 64, 1)
    if "avx2" in flags:
        return ("avx2", units, 32, 1)
    return None


def theoretical_peak(
    dtype: str,
    cores: int,
    flags: set[str] | None = None,
    clock: tuple[float, str] | None = None,
    arch: str | None = None,
) -> dict | None:
    """The ISA's theoretical MatMul rate in MACs per second on `cores` cores (float32 or int8): FMA units x
    vector lanes x MACs per lane x cores x clock. None where the flags or the clock cannot be read (GPUs
    and other dtypes too). A ceiling, stated as such in the dict's `basis`."""
    if dtype not in ("float32", "int8"):
        return None
    machine = (arch or platform.machine()).lower()
    family = "arm" if machine in ("aarch64", "arm64") else "x86" if machine in ("x86_64", "amd64", "i686") else None
    if flags is None:  # what the kernels see: less any flags a CPUID mask hides
        flags = _cpuinfo()[1] - cpuid_hidden()
    clock = cpu_clock() if clock is None else clock
    rate = _isa_rate(dtype, flags, family) if family and flags else None
    if rate is None or clock is None or cores < 1:
        return None
    isa, units, lanes, per_lane = rate
    ghz, clock_from = clock
    per_cycle = units * lanes * per_lane
    return {
        "dtype": dtype,
        "macs_per_second": per_cycle * cores * ghz * 1e9,
        "isa": isa,
        "fma_units": units,
        "lanes": lanes,
        "macs_per_lane": per_lane,
        "cores": cores,
        "ghz": ghz,
        "clock_from": clock_from,
        "basis": (
            f"{units} {'AMX tile unit' if isa == 'amx_int8' else 'FMA units'} x {lanes} lanes x {per_lane} "
            f"MAC{'s' if per_lane > 1 else ''} per lane ({isa}) x {cores} cores x {ghz:.2f} GHz ({clock_from}); "
            "a ceiling: the most units any such core has"
        ),
    }


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def describe() -> dict:
    import onnxruntime as ort

    from edgediff.runtime.session import physical_cores

    model, flags = _cpuinfo()
    hidden = cpuid_hidden()  # a lesser tier's kernels (benchmarks/cpu_tier.py): record what they saw
    clock = cpu_clock()
    described = {
        "cpu": model,
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags - hidden],
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "gpus": _gpus(),
        "clock_ghz": clock[0] if clock else None,
        "clock_from": clock[1] if clock else None,
    }
    if hidden:
        described["cpuid_hidden"] = [f for f in ISA_FLAGS if f in flags & hidden]
    return described
