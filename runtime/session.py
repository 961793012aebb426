"""One onnxruntime session per graph, with its inputs checked against what the graph declares.

As Apple's ml-stable-diffusion checks inputs against each Core ML model's description, we check
names, ranks, fixed dimensions and dtypes before a run, so a mismatch is a clear error, not an
onnxruntime stack trace.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
import threading
from typing import Callable

import numpy as np
import onnxruntime as ort

from . import graph_cache
from .errors import BundleError, InputError
from .manifest import ComponentSpec
from .providers import Resolution, resolve

log = logging.getLogger("edgediff.session")

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32,
}


def physical_cores() -> int:
    # onnxruntime's own default; spelled out so that benchmarks can report it.
    try:
        import psutil  # optional

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def session_options(threads: int | None = None, resolution: Resolution | None = None,
                    low_memory: bool = False) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or physical_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings from ORT about CPU-fallback nodes are logged by us instead
    # Idle intra-op threads sleep instead of spinning. On a 2-core laptop-class CPU spinning threads fight the
    # Python thread between graph calls: the shipped model's 4-step image took 55.8 ms spinning, 33.7 ms not;
    # full-size SD-Turbo was the same either way (17.1-18.1 s, run to run). Desktop apps share the CPU too.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if low_memory:
        # Low-memory mode trades speed for peak: no arena (freed buffers go back to the system instead of
        # staying reserved), no memory-pattern plan (allocated whole up front) and no prepacked copies of
        # weights. Full-size SD-Turbo int8-static, one graph at a time: 1.95 -> 1.83 -> 1.68 GiB peak
        # (benchmarks/README.md); SessionPool also holds glibc's mmap threshold (1.33 GiB).
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if resolution is not None:
        resolution.provider.configure(opts)
    return opts


class GraphSession:
    """One graph's session. `cache_dir`: keep its optimised form there (see graph_cache.py)."""

    def __init__(self, name: str, path, spec: ComponentSpec, resolution: Resolution | None, bundle_path,
                 threads: int | None = None, cache_dir=None, low_memory: bool = False):
        self.name = name
        self.spec = spec
        resolution = resolution or resolve("cpu")
        self.cache = "off"
        try:
            if cache_dir is None:
                self.session = ort.InferenceSession(str(path), sess_options=session_options(threads, resolution, low_memory),
                                                    providers=resolution.ort_providers)
            else:
                key = graph_cache.cache_key(name, spec.files[spec.graph_file]["sha256"], resolution.provider.name, path)
                self.session, self.cache = graph_cache.open_cached(
                    path, key, spec.size, lambda: session_options(threads, resolution, low_memory), resolution.ort_providers,
                    cache_dir)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError("graph_unloadable", path=bundle_path, file=path.name, detail=str(exc).splitlines()[0]) from exc
        # a graph the chosen provider could not take runs on the CPU alone: say so
        self.fell_back_to_cpu = resolution.provider.name != "cpu" and self.session.get_providers()[0] != resolution.provider.ort_name
        if self.fell_back_to_cpu:
            log.warning("%s: %s did not take this graph; it runs on the CPU", name, resolution.provider.name)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        # called with each run's checked feeds (export records calibration inputs this way)
        self.observers: list[Callable[[dict[str, np.ndarray]], None]] = []
        declared = {t.name for t in spec.inputs}
        if declared != set(self.inputs):
            raise BundleError("graph_mismatch", path=bundle_path, component=name,
                              detail=f"graph inputs {sorted(self.inputs)} but manifest lists {sorted(declared)}")

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def _check(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise InputError("graph_input", component=self.name, name=sorted(missing)[0], detail="is missing")
        out = {}
        for name, value in feeds.items():
            arg = self.inputs.get(name)
            if arg is None:
                raise InputError("graph_input", component=self.name, name=name, detail="is not an input of this graph")
            value = np.asarray(value)
            if len(arg.shape) != value.ndim:
                raise InputError("graph_input", component=self.name, name=name,
                                 detail=f"has rank {value.ndim}, the graph declares {len(arg.shape)} ({arg.shape})")
            for axis, (want, got) in enumerate(zip(arg.shape, value.shape)):
                if isinstance(want, int) and want != got:
                    raise InputError("graph_input", component=self.name, name=name,
                                     detail=f"has size {got} on axis {axis}, the graph is fixed at {want}")
            out[name] = value.astype(_ORT_TO_NUMPY.get(arg.type, value.dtype), copy=False)
        return out

    def run(self, run_options: ort.RunOptions | None = None, **feeds) -> list[np.ndarray]:
        checked = self._check(feeds)
        for observe in self.observers:
            observe(checked)
        return self.session.run(self.output_names, checked, run_options)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, held fixed


def hold_mmap_threshold() -> bool:
    """Low-memory mode, glibc only: every allocation over 128 KiB is its own mapping, handed back to the
    system when freed. glibc otherwise raises that threshold after each large free, so the next graph's
    buffers land in the heap the previous graph left fragmented, and resident memory stays high. Full-size
    SD-Turbo int8-static, one image in low-memory mode: peak 1.70 -> 1.33 GiB, UNet call 5.4-7.0 -> 7.9 s
    (benchmarks/README.md). The setting is process-wide. Returns whether it was applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to hold
        return False
    applied = bool(mallopt(M_MMAP_THRESHOLD, LOW_MEMORY_MMAP_THRESHOLD))
    if applied:
        log.info("low memory: glibc's mmap threshold held at %d bytes", LOW_MEMORY_MMAP_THRESHOLD)
    return applied


class SessionPool:
    """A bundle's graphs as sessions: all opened up front (fast), or one alive at a time (low memory).

    Low-memory mode opens a graph when it is first needed and closes the others first, so the peak is
    the largest graph rather than the sum (text encoder, then denoiser, then decoder).
    """

    def __init__(self, opener: Callable[[str], GraphSession], names: list[str], low_memory: bool = False):
        self._opener = opener
        self.low_memory = low_memory
        self._open: dict[str, GraphSession] = {}
        self._lock = threading.Lock()
        if low_memory:
            hold_mmap_threshold()
        else:
            self._open = {name: opener(name) for name in names}

    def get(self, name: str) -> GraphSession:
        with self._lock:
            session = self._open.get(name)
            if session is None:
                if self.low_memory:
                    self._open.clear()  # the previous stage's session goes before the next one opens
                    gc.collect()
                session = self._open[name] = self._opener(name)
            return session

    @property
    def loaded(self) -> list[str]:
        return list(self._open)

    def close(self) -> None:
        with self._lock:
            self._open.clear()
        gc.collect()
