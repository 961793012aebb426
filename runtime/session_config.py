"""onnxruntime's SessionOptions for one graph: threads, low memory, fixed dimensions and the provider's own needs.

What low-memory mode costs and saves is measured in docs/benchmarks.md ("Low memory").
"""

from __future__ import annotations

import os

import onnxruntime as ort

from .providers import Resolution


def physical_cores() -> int:
    # onnxruntime's own default; spelled out so that benchmarks can report it
    try:
        import psutil  # optional

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


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
