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
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import onnxruntime as ort

from . import graph_cache
from .binding import BoundRunner, DeviceUnsupported, shape_key, static_dims
from .errors import BundleError, EdgediffError, InputError
from .manifest import ComponentSpec
from .provider_loading import new_session
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
                    low_memory: bool = False, dims: dict[str, int] | None = None) -> ort.SessionOptions:
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
    for name, size in (dims or {}).items():  # a shape-fixed session (captured graphs, NPUs): shape arithmetic folds away
        opts.add_free_dimension_override_by_name(name, size)
    if resolution is not None:
        resolution.provider.configure(opts)
    return opts


class GraphSession:
    """One graph's session. `cache_dir`: keep its optimised form there (see graph_cache.py).

    On providers with device memory (`Provider.device_type`), runs go through I/O binding (binding.py) unless
    `io_binding=False`. `capture=True` replays captured graphs (CUDA graphs): the graph is reopened for each
    new input shape with its dimensions fixed and the provider's capture option on, replacing the previous
    session (one copy of the weights on the device); a shape onnxruntime will not capture runs bound,
    uncaptured, on the dynamic session, and the reason is logged and reported. Providers that compile for fixed
    shapes only (`Provider.static_shapes`: NPUs) get the same per-shape sessions, without capture.
    """

    def __init__(self, name: str, path, spec: ComponentSpec, resolution: Resolution | None, bundle_path,
                 threads: int | None = None, cache_dir=None, low_memory: bool = False,
                 io_binding: bool | None = None, capture: bool = False):
        self.name = name
        self.spec = spec
        self.path = path
        self.bundle_path = bundle_path
        self.resolution = resolution = resolution or resolve("cpu")
        self._threads, self._low_memory, self._cache_dir = threads, low_memory, cache_dir
        device_type = resolution.provider.device_type
        binds = bool(device_type) if io_binding is None else (io_binding and bool(device_type))
        self.binding_state = "on" if binds else "off"  # or "refused: <why>" after a failed first bind
        self.capture = capture and self.io_binding and resolution.provider.can_capture
        # NPU compilers take fixed shapes only: there, as for captured graphs, each input shape gets its own session
        self.fixed_shapes = self.capture or resolution.provider.static_shapes
        self.shapes = "dynamic"  # or "fixed <dims>", or why a shape-fixed session could not be made
        self._device_id = int(resolution.options.get("device_id", 0))
        self._lock = threading.Lock()
        self._static_key: tuple | None = None
        self._refused_shapes: dict[tuple, str] = {}
        self.cache = "off"
        self.session = self._open_dynamic()
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._runner = self._runner_for(self.session)
        # called with each run's checked feeds (export records calibration inputs this way)
        self.observers: list[Callable[[dict[str, np.ndarray]], None]] = []
        declared = {t.name for t in spec.inputs}
        if declared != set(self.inputs):
            raise BundleError("graph_mismatch", path=bundle_path, component=name,
                              detail=f"graph inputs {sorted(self.inputs)} but manifest lists {sorted(declared)}")

    def _open_dynamic(self) -> ort.InferenceSession:
        try:
            session = self._open()
        except EdgediffError:
            raise  # ours already says what is wrong (a bad EDGEDIFF_CACHE_MAX_GB)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise BundleError("graph_unloadable", path=self.bundle_path, file=self.path.name,
                              detail=_summary(exc) + self.resolution.provider.load_hint(self.spec.precision)) from exc
        self._note_fallback(session)
        return session

    def _open(self, dims: dict[str, int] | None = None, **extra) -> ort.InferenceSession:
        """A session of this graph, through the graph cache where there is one. `dims`: fixed dimensions (a
        shape-fixed session); `extra`: provider options (graph capture). Both key the cache: a shape-fixed
        graph's optimised form differs from the dynamic one's, and a cached one spares each new image size its
        optimiser run."""
        resolution, path = self.resolution, self.path
        factory = lambda: session_options(self._threads, resolution, self._low_memory, dims)  # noqa: E731
        provider = resolution.provider
        if self._cache_dir is None or (provider.compiles and not provider.saves_context):
            # a compiling provider keeps its own cache (onnxruntime cannot save its compiled graph)
            own_cache = provider.cache_options(self._cache_dir) if self._cache_dir is not None else {}
            self.cache = "provider" if own_cache else "off"
            own_cache = {k: v for k, v in own_cache.items() if k not in resolution.overrides}  # the caller's win
            return new_session(path, factory(), resolution.ort_providers_with(**own_cache, **extra))
        tag = resolution.cache_tag_fixed({"dims": dims or {}, "options": extra}) if dims or extra else resolution.cache_tag
        key = graph_cache.cache_key(self.name, self.spec.files[self.spec.graph_file]["sha256"], tag, path)
        session, self.cache = graph_cache.open_cached(path, key, self.spec.size, factory,
                                                      resolution.ort_providers_with(**extra), self._cache_dir,
                                                      save="context" if provider.compiles else "graph")
        return session

    def _note_fallback(self, session: ort.InferenceSession) -> None:
        # a graph the chosen provider could not take runs on the CPU alone: say so
        self.fell_back_to_cpu = (self.resolution.provider.name != "cpu"
                                 and session.get_providers()[0] != self.resolution.provider.ort_name)
        if self.fell_back_to_cpu:
            log.warning("%s: %s did not take this graph; it runs on the CPU", self.name, self.resolution.provider.name)

    def _run_fixed(self, feeds: dict[str, np.ndarray], run_options) -> list[np.ndarray]:
        key = shape_key(feeds)
        with self._lock:  # one call at a time: a new shape swaps the session under the lock
            if key in self._refused_shapes:
                if self._static_key is not None:
                    self._use_dynamic()
            elif key != self._static_key:
                self._open_static(key, feeds)
            if self._runner is not None:
                return self._runner.run(feeds, run_options)
            return self.session.run(self.output_names, feeds, run_options)

    def _runner_for(self, session: ort.InferenceSession, graph_id: int | None = None) -> BoundRunner | None:
        """The session's I/O binding (replaying captured graph `graph_id`), or None where it runs unbound."""
        if not self.io_binding:
            return None
        return BoundRunner(session, self.resolution.provider.device_type, self._device_id, graph_id)

    def _use_dynamic(self) -> None:
        self.session = self._runner = None
        gc.collect()
        self._static_key = None
        self.session = self._open_dynamic()
        self._runner = self._runner_for(self.session)

    def _open_static(self, key: tuple, feeds: dict[str, np.ndarray]) -> None:
        """Replaces the session by one fixed to these feeds' shapes (with graph capture on, when capturing)."""
        capture_option = {self.resolution.provider.graph_capture_option: "1"} if self.capture else {}
        try:
            dims = static_dims(self.inputs, feeds)
            self.session = self._runner = None
            gc.collect()  # the previous session's device memory goes before the next session takes its own
            session = self._open(dims, **capture_option)
        except EdgediffError:
            raise
        except Exception as exc:  # onnxruntime's own types; e.g. "cannot use the graph capture feature"
            reason = _summary(exc)
            what = "captured" if self.capture else "shape-fixed"
            log.warning("%s: no %s graph for %s (%s); it runs on the dynamic one%s", self.name, what,
                        _dims_text(feeds), reason, ", bound, without capture" if self.capture else "")
            self._refused_shapes[key] = reason
            self.shapes = f"refused: {reason}"
            self._use_dynamic()
            return
        self._note_fallback(session)
        self.session, self._static_key = session, key
        self.shapes = f"fixed {_dims_text(feeds)}"
        self._runner = self._runner_for(session, graph_id=0 if self.capture else None)
        log.info("%s: %s", self.name, self.capture_state if self.capture else self.shapes)

    @property
    def io_binding(self) -> bool:
        return self.binding_state == "on"

    @property
    def capture_state(self) -> str:
        """"off", "captured <dims>", or why onnxruntime would not capture: the shape-fixed state, when capturing."""
        if not self.capture or self.shapes == "dynamic":
            return "off"
        return "captured " + self.shapes.removeprefix("fixed ") if self.shapes.startswith("fixed ") else self.shapes

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
        if self.fixed_shapes:
            return self._run_fixed(checked, run_options)
        if self._runner is not None:
            return self._run_bound(checked, run_options)
        return self.session.run(self.output_names, checked, run_options)

    def _run_bound(self, feeds: dict[str, np.ndarray], run_options) -> list[np.ndarray]:
        try:
            return self._runner.run(feeds, run_options)
        except DeviceUnsupported as exc:
            # this onnxruntime build cannot place buffers on the provider's device (DirectML's Python binding came
            # in onnxruntime 1.17, and it is not checked on hardware here): run unbound, and say so. Any other
            # failure is the run's own and is raised as it is.
            reason = _summary(exc)
            log.warning("%s: I/O binding on %r failed (%s); it runs unbound", self.name,
                        self.resolution.provider.device_type, reason)
            self._runner = None
            self.binding_state = f"refused: {reason}"
            return self.session.run(self.output_names, feeds, run_options)


def _summary(exc: Exception) -> str:
    """onnxruntime's message in one line: its first line, and its last when the cause is there (OpenVINO's
    compile errors put the reason at the end of a long trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip(" ;")]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def _dims_text(feeds: dict[str, np.ndarray]) -> str:
    return ", ".join(f"{name} {'x'.join(map(str, value.shape)) or 'scalar'}" for name, value in sorted(feeds.items()))


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
    """A bundle's graphs as sessions: all opened up front (fast; side by side with `parallel`), or one alive at a
    time (low memory).

    Low-memory mode opens a graph when it is first needed and closes the others first, so the peak is
    the largest graph rather than the sum (text encoder, then denoiser, then decoder).
    """

    def __init__(self, opener: Callable[[str], GraphSession], names: list[str], low_memory: bool = False,
                 parallel: bool = False):
        self._opener = opener
        self.low_memory = low_memory
        self._open: dict[str, GraphSession] = {}
        self._lock = threading.Lock()
        if low_memory:
            hold_mmap_threshold()
        elif parallel and len(names) > 1:
            # onnxruntime releases the GIL while it loads and optimises a graph, so the graphs open side by side and
            # a start takes as long as the largest graph: full-size SD-Turbo fp32 on 2 cores, sessions created in
            # 10.0-11.0 s instead of 14.4-18.8 s uncached, 1.2-1.3 s instead of 2.5 s cached, the same peak memory
            # (/work/runs/s9/par). The first error in `names` order is raised.
            with ThreadPoolExecutor(max_workers=len(names), thread_name_prefix="edgediff-open") as pool:
                self._open = dict(zip(names, pool.map(opener, names)))
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
