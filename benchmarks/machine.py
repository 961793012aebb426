"""What machine a benchmark ran on: CPU model and instruction sets, cores, memory, OS, runtimes, GPU."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys

# Instruction-set flags that decide which onnxruntime kernels run (from /proc/cpuinfo names).
ISA_FLAGS = (
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
    return {
        "cpu": model,
        "machine": platform.machine(),
        "physical_cores": physical_cores(),
        "logical_cores": os.cpu_count(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "gpus": _gpus(),
    }
