"""The `edgediff` command's entry point: what must be settled before anything is imported, then the CLI.

`edgediff export` takes its memory in huge pages where glibc and Linux offer them. The export allocates and frees
gigabytes: PyTorch's exporter, onnx's serialisation and onnxruntime's sessions take large blocks from glibc's
malloc, which maps each one afresh, a page fault per 4 KiB page: 3.5-6.9 million of them and 12-20 s of system time
in the full-size SD-Turbo fp32 export on 2 cores. With glibc's tunable `glibc.malloc.hugetlb=1` (glibc 2.35 and
newer) malloc asks for transparent huge pages (2 MiB) for those blocks: 0.29-0.44 million faults, 7-11 s, and the
export 7% faster (docs/benchmarks.md, "Export cost"). glibc reads its tunables only when a process starts, so the command starts
itself again with the tunable set: the same process (os.execve keeps its id), arguments and interpreter, before
anything heavy is imported. Where GLIBC_TUNABLES names the tunable already (=0 to opt out), nothing changes.
Library callers set the variable themselves.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HUGETLB_TUNABLE = "glibc.malloc.hugetlb"
MIN_GLIBC = (2, 35)  # the first glibc with the tunable; older ones ignore it, and the restart would buy nothing
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # "always [madvise] never": the one in brackets
# The commands whose memory traffic repays a restart (0.05-0.1 s, before the CLI's imports): an export's gigabytes.
HUGE_PAGE_COMMANDS = frozenset({"export"})


def tuned_environment(environ: dict, libc: tuple[str, str], thp_setting: str | None) -> dict | None:
    """`environ` with glibc's huge-page tunable added, or None where there is nothing to gain: not glibc, a glibc
    before 2.35, transparent huge pages off (or unknown), or the tunable set already (either way: the user's)."""
    if HUGETLB_TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    name, version = libc
    try:
        release = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None
    if name != "glibc" or release < MIN_GLIBC:
        return None
    if not thp_setting or ("[always]" not in thp_setting and "[madvise]" not in thp_setting):
        return None
    tunables = ":".join(filter(None, (environ.get("GLIBC_TUNABLES"), f"{HUGETLB_TUNABLE}=1")))
    return {**environ, "GLIBC_TUNABLES": tunables}


def command(argv: list[str]) -> str | None:
    """The subcommand in `argv` (sys.argv): its first word that is not an option (the group's one option, -v, takes
    no value)."""
    return next((arg for arg in argv[1:] if not arg.startswith("-")), None)


def huge_page_environment(environ: dict) -> dict | None:
    """tuned_environment for this host: None off Linux, or where its huge-page setting cannot be read."""
    if sys.platform != "linux":
        return None
    import platform

    try:
        thp_setting = THP_SETTING.read_text()
    except OSError:
        return None
    return tuned_environment(environ, platform.libc_ver(), thp_setting)


def restart_with_huge_pages(argv: list[str]) -> None:
    """Starts this process again with glibc's huge-page tunable (huge_page_environment) where the command is one that
    repays it; returns where it is not. Frozen applications are left as they are (a restart would unpack them
    again), and so is an embedded interpreter (no sys.executable to start)."""
    if getattr(sys, "frozen", False) or not sys.executable or command(argv) not in HUGE_PAGE_COMMANDS:
        return
    environ = huge_page_environment(dict(os.environ))
    if environ is None:
        return
    # the interpreter by its full path: argv[0] as typed ("python3") would be looked up on PATH, maybe outside a venv
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError as exc:  # the interpreter cannot be started again: the export runs as it is, in 4 KiB pages
        logging.getLogger("edgediff.cli").debug("no restart with huge pages: %s", exc)


def main() -> None:
    restart_with_huge_pages(sys.argv)
    from .main import main as cli_main

    cli_main()
