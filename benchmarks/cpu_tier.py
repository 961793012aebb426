"""Run a command as a lesser CPU: its kernels chosen as on an AVX2-only, AVX-VNNI or AVX-512 VNNI CPU.

What int8 and fp32 kernels gain depends on the instruction set (docs/benchmarks.md, "What int8 buys depends
on the CPU"), and one machine has one. On Linux x86-64 with CPUID faulting (`cpuid_fault` in /proc/cpuinfo),
`cpuid_mask.c`, built here with the system's C compiler and loaded with LD_PRELOAD, hides the named
instruction-set bits from every CPUID the command's processes run. onnxruntime's MLAS, numpy, PyTorch and
oneDNN then pick the kernels they pick on that tier, and this CPU's cores run them.

What it measures, and what not: the kernels and graphs of a tier, on this CPU's cores, caches and memory. A
real CPU of that tier has its own cores: how many of its ports run each instruction, its clock, its memory.
Figures made this way say so (the machine record's `cpuid_hidden`, and "emulated" in the docs' labels).

    python -m edgediff.benchmarks.cpu_tier avx2 -- edgediff bench --model BUNDLE ...
    python -m edgediff.benchmarks.cpu_tier --list
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("cpuid_mask.c")
HIDE_VARIABLE = "EDGEDIFF_CPUID_HIDE"  # read by cpuid_mask.c


@dataclass(frozen=True)
class Feature:
    """One instruction-set bit of CPUID, by its /proc/cpuinfo name (Intel SDM vol. 2, CPUID leaf 07H)."""

    flag: str
    leaf: int
    subleaf: int
    register: int  # 0-3: eax, ebx, ecx, edx
    bit: int

    @property
    def spec(self) -> str:
        return f"{self.flag}:{self.leaf}.{self.subleaf}.{self.register}.{self.bit}"


EAX, EBX, ECX, EDX = range(4)
FEATURES = {
    f.flag: f
    for f in (
        Feature("avx512f", 7, 0, EBX, 16),
        Feature("avx512dq", 7, 0, EBX, 17),
        Feature("avx512ifma", 7, 0, EBX, 21),
        Feature("avx512pf", 7, 0, EBX, 26),
        Feature("avx512er", 7, 0, EBX, 27),
        Feature("avx512cd", 7, 0, EBX, 28),
        Feature("avx512bw", 7, 0, EBX, 30),
        Feature("avx512vl", 7, 0, EBX, 31),
        Feature("avx512vbmi", 7, 0, ECX, 1),
        Feature("avx512_vbmi2", 7, 0, ECX, 6),
        Feature("avx512_vnni", 7, 0, ECX, 11),
        Feature("avx512_bitalg", 7, 0, ECX, 12),
        Feature("avx512_vpopcntdq", 7, 0, ECX, 14),
        Feature("avx512_4vnniw", 7, 0, EDX, 2),
        Feature("avx512_4fmaps", 7, 0, EDX, 3),
        Feature("avx512_vp2intersect", 7, 0, EDX, 8),
        Feature("amx_bf16", 7, 0, EDX, 22),
        Feature("avx512_fp16", 7, 0, EDX, 23),
        Feature("amx_tile", 7, 0, EDX, 24),
        Feature("amx_int8", 7, 0, EDX, 25),
        Feature("avx_vnni", 7, 1, EAX, 4),
        Feature("avx512_bf16", 7, 1, EAX, 5),
        Feature("amx_fp16", 7, 1, EAX, 21),
        Feature("avx_ifma", 7, 1, EAX, 23),
        Feature("avx_vnni_int8", 7, 1, EDX, 4),
        Feature("avx_ne_convert", 7, 1, EDX, 5),
        Feature("amx_complex", 7, 1, EDX, 8),
        Feature("avx_vnni_int16", 7, 1, EDX, 10),
        Feature("avx10", 7, 1, EDX, 19),
    )
}
_AVX512 = tuple(f for f in FEATURES if f.startswith("avx512"))
_AMX = tuple(f for f in FEATURES if f.startswith("amx"))
_AVX_VNNI_LATER = ("avx_vnni_int8", "avx_vnni_int16", "avx_ifma", "avx_ne_convert", "avx10")


@dataclass(frozen=True)
class Tier:
    what: str  # the CPUs whose kernels it selects
    hides: tuple[str, ...]


TIERS = {
    "avx2": Tier(
        "AVX2 and FMA alone: Intel Haswell to Comet Lake, AMD Zen 1 to 3",
        _AVX512 + _AMX + ("avx_vnni",) + _AVX_VNNI_LATER,
    ),
    "avx-vnni": Tier(
        "AVX2 with 256-bit int8 dot products (AVX-VNNI): Intel Alder Lake to Meteor Lake laptops and desktops",
        _AVX512 + _AMX + _AVX_VNNI_LATER,
    ),
    "avx512-vnni": Tier(
        "AVX-512 with int8 dot products and bf16, no AMX: AMD Zen 4, Intel Cooper Lake (and, for onnxruntime's "
        "kernels, which use no bf16, Intel Cascade Lake and Ice Lake)",
        _AMX + ("avx512_fp16", "avx_vnni") + _AVX_VNNI_LATER,
    ),
}


class CpuTierError(RuntimeError):
    pass


def hide_spec(tier: str) -> str:
    """EDGEDIFF_CPUID_HIDE's value for `tier`: every bit it hides, as cpuid_mask.c reads them."""
    if tier not in TIERS:
        raise CpuTierError(f"unknown tier {tier!r}: one of {', '.join(TIERS)}")
    return ",".join(FEATURES[flag].spec for flag in TIERS[tier].hides)


def check_host(flags: frozenset[str] | None = None) -> None:
    """Raise CpuTierError where this machine cannot mask CPUID: not Linux on x86-64, or no CPUID faulting among its
    /proc/cpuinfo `flags` (default: cpu_features.cpu_flags())."""
    from edgediff.runtime.cpu_features import cpu_flags

    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise CpuTierError("a CPUID mask needs Linux on x86-64")
    if "cpuid_fault" not in (cpu_flags() if flags is None else flags):
        raise CpuTierError("this CPU (or its hypervisor) offers no CPUID faulting: no cpuid_fault in /proc/cpuinfo")


def build(cache: Path | None = None) -> Path:
    """The mask library, compiled once per source version into the user's cache folder."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    cache = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgediff"
    library = cache / f"cpuid_mask-{digest}.so"
    if library.exists():
        return library
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise CpuTierError("no C compiler (cc or gcc) to build the CPUID mask with")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        built = Path(scratch) / library.name
        result = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(SOURCE)], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise CpuTierError(f"building the CPUID mask failed:\n{result.stderr.strip()}")
        os.replace(built, library)  # atomic: a concurrent build finds a whole library or none
    return library


def environment(tier: str, environ: dict | None = None, library: Path | None = None) -> dict:
    """`environ` (default: this process's) with the mask for `tier` preloaded."""
    env = dict(os.environ if environ is None else environ)
    spec = hide_spec(tier)
    check_host()
    library = library or build()
    env["LD_PRELOAD"] = " ".join(filter(None, (str(library), env.get("LD_PRELOAD"))))
    env[HIDE_VARIABLE] = spec
    return env


def compare_images(runs: dict[str, Path]) -> tuple[str, list[dict]]:
    """Each edgediff image saved by `edgediff bench` in each run against the same file in the first run (the same
    bundle, latents and prompt, other kernels): the first run's name, and each image's worst PSNR and SSIM. So a
    tier's kernels are seen to compute the same images (int8 without VNNI adds pairs of products in 16 bits,
    which may saturate)."""
    import numpy as np

    from .metrics import psnr, ssim

    (baseline, first), *others = runs.items()
    rows = []
    for reference in sorted((Path(first) / "images").glob("*-edgediff.npy")):
        base = np.load(reference).astype(np.float64) / 255
        for tier, folder in others:
            other = Path(folder) / "images" / reference.name
            if not other.is_file():
                raise CpuTierError(f"{other}: no such image in the {tier} run")
            image = np.load(other).astype(np.float64) / 255
            worst = min(psnr(i, b) for i, b in zip(image, base))
            rows.append(
                {
                    "tier": tier,
                    "image": reference.stem,
                    "psnr_db": None if worst == float("inf") else round(worst, 2),  # None: the same pixels
                    "ssim": round(min(ssim(i, b) for i, b in zip(image, base)), 4),
                }
            )
    return baseline, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edgediff.benchmarks.cpu_tier",
        description="Run COMMAND with its kernels chosen as on a lesser CPU (a CPUID mask).",
    )
    parser.add_argument("tier", nargs="?", choices=sorted(TIERS))
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run")
    parser.add_argument("--list", action="store_true", help="the tiers and the flags each hides")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=RUN",
        help="instead of running: each `edgediff bench --out` folder's images against the first's, as JSON",
    )
    parser.add_argument("--out", type=Path, help="with --compare: write the JSON here")
    args = parser.parse_args(argv)
    if args.list:
        for name, tier in TIERS.items():
            print(f"{name}: {tier.what}\n    hides {' '.join(tier.hides)}")
        return 0
    if args.compare:
        return _write_comparison(args.compare, args.out, argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not args.tier or not command:
        parser.error("give a tier and, after --, a command")
    try:
        env = environment(args.tier)
    except CpuTierError as e:
        print(f"cpu_tier: {e}", file=sys.stderr)
        return 2
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"cpu_tier: cannot run {command[0]!r}: {e}", file=sys.stderr)
        return 127
    return 0  # not reached: execvpe replaced this process


def _write_comparison(pairs: list[str], out: Path | None, argv) -> int:
    from .op_profile import result_header, write_result

    runs = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    if len(runs) != len(pairs) or len(runs) < 2:
        print("cpu_tier: --compare takes two or more NAME=RUN, the first the baseline", file=sys.stderr)
        return 2
    try:
        baseline, rows = compare_images({name: Path(folder) for name, folder in runs.items()})
    except (CpuTierError, OSError) as e:
        print(f"cpu_tier: {e}", file=sys.stderr)
        return 2
    write_result({**result_header("cpu-tier-images", "cpu_tier", argv), "baseline": baseline, "results": rows}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
