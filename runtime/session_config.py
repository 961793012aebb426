"""onnxruntime's SessionOptions for one graph: threads, low memory, fixed dimensions and the provider's own needs.

What low-memory mode costs and saves is measured in docs/benchmarks.md ("Low memory").
"""

from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort

from .providers import Resolution

_CPU_SYSFS = Path("/sys/devices/system/cpu")


def physical_cores() -> int:
    """The physical cores this process may run on: one onnxruntime thread each (onnxruntime's own default, spelled
    out so that benchmarks can report it). Only those of the CPUs in the process's affinity (taskset, a container's
    cpuset), which the machine's count ignores: a process given 2 of 8 cores that ran 8 threads would have them take
    turns on 2."""
    try:
        import psutil  # optional

        machine = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        machine = os.cpu_count() or 1
    if not hasattr(os, "sched_getaffinity"):  # Windows, macOS: no affinity to read
        return machine
    return min(machine, allowed_physical_cores(os.sched_getaffinity(0), os.cpu_count() or 1, machine))


def allowed_physical_cores(allowed: set[int], logical: int, physical: int, sysfs: Path = _CPU_SYSFS) -> int:
    """The physical cores among the logical CPUs `allowed`: their distinct sets of hyper-threads as Linux's topology
    gives them (a core's `thread_siblings_list`: core ids alone repeat across a package's dies), else `allowed`
    scaled by the machine's `physical` / `logical` (its hyper-threads per core) where a CPU's topology is missing."""
    cores = set()
    for cpu in allowed:
        try:
            cores.add((sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:  # not Linux's sysfs, or not all of it: by the machine's ratio
            return max(1, round(len(allowed) * physical / max(logical, 1)))
    return max(1, len(cores))


def skip_layout_changes(opts: ort.SessionOptions) -> ort.SessionOptions:
    """Low memory on the CPU, graphs with float convolutions: every optimisation but the layout ones. Those
    rewrite convolutions into blocked (NCHWc) form, with reordered copies of their weights (anonymous memory,
    where the originals are memory-mapped from external data) and reorder buffers around every block. Full-size
    SD-Turbo at 512x512: the VAE decoder opens at 0.27 instead of 0.45 GB and peaks at 0.94 instead of 1.07 GB;
    an int4 UNet (float convolutions) opens at 0.09 instead of 2.36 GB, with 0.22 instead of 2.48 GB anonymous
    at its peak; neither runs slower (docs/benchmarks.md, "Low memory"). Static int8 graphs keep them
    (graph_loader.LAYOUT_PRECISIONS)."""
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    return opts


def session_options(
    threads: int | None = None,
    resolution: Resolution | None = None,
    low_memory: bool = False,
    dims: dict[str, int] | None = None,
) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings from ORT about CPU-fallback nodes are logged by us instead
    # Idle intra-op threads sleep instead of spinning: on a few cores spinning threads fight the Python thread
    # between graph calls, and desktop apps share the CPU too
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        # trades speed for peak memory: no arena (freed buffers go back to the system instead of staying
        # reserved), no memory-pattern plan (allocated whole up front), no prepacked copies of weights
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
    # a shape-fixed session (captured graphs, NPUs): its shape arithmetic folds away
    for name, size in (dims or {}).items():
        opts.add_free_dimension_override_by_name(name, size)
    if resolution is not None:
        resolution.provider.configure(opts)
    return opts
