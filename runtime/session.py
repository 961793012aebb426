"""One onnxruntime session per graph (GraphSession), and a bundle's graphs as a pool of them (SessionPool).

A GraphSession puts together what each graph needs: its inputs checked against what it declares
(input_check.py), its sessions opened through the graph cache (graph_loader.py), runs bound to device
memory where the provider has it (binding.py), and a session per input shape for captured graphs and NPUs
(shape_sessions.py). The states it reports are in session_states.py. `session_options` and
`physical_cores` (session_config.py) are imported from here by the pipeline and the benchmarks.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from . import lora_adapters
from .binding import Binding, BoundRunner
from .graph_loader import GraphLoader
from .input_check import InputCheck, check_manifest
from .manifest import ComponentSpec
from .providers import Resolution, resolve
from .session_config import physical_cores, session_options  # noqa: F401  (re-exported)
from .session_states import CacheStatus, CaptureState, ShapeState
from .shape_sessions import ShapeSessions

log = logging.getLogger("edgediff.session")


class GraphSession:
    """One graph's session. `cache_folder`: keep its optimized form there (graph_cache.py); None: no cache.

    On providers with device memory (`Provider.device_type`), runs go through I/O binding unless
    `io_binding=False`. `capture=True` replays captured graphs (CUDA graphs), one session per input shape
    (shape_sessions.py); a shape onnxruntime will not capture runs bound, uncaptured, on the dynamic session, and
    the reason is logged and reported. Providers that compile for fixed shapes only (`Provider.static_shapes`:
    NPUs) get the same per-shape sessions, without capture.
    """

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ComponentSpec,
        resolution: Resolution | None,
        bundle_path,
        threads: int | None = None,
        cache_folder: Path | None = None,
        low_memory: bool = False,
        io_binding: bool | None = None,
        capture: bool = False,
        cpu_layout: bool = True,
        refused: str = "",
    ):
        self.name = name
        self.path = path
        self.spec = spec
        self.bundle_path = bundle_path
        self.resolution = resolution = resolution or resolve("cpu")
        provider = resolution.provider
        self.binding = Binding(
            provider.device_type,
            int(resolution.options.get("device_id", 0)),
            wanted=io_binding is None or bool(io_binding),
        )
        self._loader = GraphLoader(
            name,
            path,
            spec,
            resolution,
            bundle_path,
            threads,
            low_memory,
            cache_folder,
            cpu_layout=cpu_layout,
            refused=refused,
        )
        # a captured graph replays on fixed buffer addresses: bound runs only
        capture = bool(capture) and self.binding.on and provider.can_capture
        self._sessions = ShapeSessions(
            name, self._loader, self.binding, per_shape=capture or provider.static_shapes, capture=capture
        )
        self.inputs = self._sessions.inputs
        self.output_names = self._sessions.output_names
        check_manifest(name, spec, self.inputs, bundle_path)
        # public: export/calibration.py records feeds as the graph sees them
        self.check_inputs = InputCheck(name, self.inputs)

    def run(self, run_options: ort.RunOptions | None = None, **feeds) -> list[np.ndarray]:
        # the calling thread's run-time LoRA adapter for this graph, if its call has one (lora_adapters.py); such a
        # run goes unbound: onnxruntime's I/O-bound runs ignore active adapters (it only logs a warning)
        bound = not lora_adapters.has_active(self.name)
        options = lora_adapters.run_options_for(self.name, run_options)
        return self._sessions.run(self.check_inputs(feeds), options, bound=bound)

    @property
    def session(self) -> ort.InferenceSession:
        return self._sessions.session

    @property
    def runner(self) -> BoundRunner | None:
        """The current session's I/O binding, or None where it runs unbound."""
        return self._sessions.runner

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    @property
    def keeps_layout(self) -> bool:
        """Opened without onnxruntime's layout rewrites (low memory on the CPU: session_config.py)."""
        return self._loader.keeps_layout

    @property
    def fell_back_to_cpu(self) -> bool:
        """The chosen provider did not take this graph: it runs on the CPU alone."""
        return self._loader.falls_back(self.session)

    @property
    def refusal(self) -> str:
        """Why the chosen provider could not take this graph, where it failed and the graph fell back ("" else)."""
        return self._loader.refused

    @property
    def cache(self) -> CacheStatus:
        return self._sessions.cache

    @property
    def io_binding(self) -> bool:
        return self.binding.on

    @property
    def binding_state(self) -> str:
        """ "on", "off", or "refused: <why>" after a failed first bind."""
        return self.binding.text

    @property
    def capture(self) -> bool:
        return self._sessions.capture

    @property
    def captured(self) -> CaptureState:
        return self._sessions.captured

    @property
    def capture_state(self) -> str:
        """ "off", "captured <dims>", or why onnxruntime would not capture."""
        return self._sessions.capture_state

    @property
    def shape_state(self) -> ShapeState:
        return self._sessions.state

    @property
    def shapes(self) -> str:
        """ "dynamic", "fixed <dims>", or why onnxruntime would not fix them."""
        return self._sessions.shapes


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, held fixed


def hold_mmap_threshold() -> bool:
    """Low-memory mode, glibc only: every allocation over 128 KiB is its own mapping, handed back to the
    system when freed. glibc otherwise raises that threshold after each large free, so the next graph's
    buffers land in the heap the previous graph left fragmented, and resident memory stays high (a lower
    peak for slower UNet calls: docs/benchmarks.md, "Low memory"). The setting is process-wide. Returns whether it was
    applied."""
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

    def __init__(
        self, opener: Callable[[str], GraphSession], names: list[str], low_memory: bool = False, parallel: bool = False
    ):
        self._opener = opener
        self.low_memory = low_memory
        self._open: dict[str, GraphSession] = {}
        self._lock = threading.Lock()
        if low_memory:
            hold_mmap_threshold()
        elif parallel and len(names) > 1:
            # onnxruntime releases the GIL while it loads and optimizes a graph, so the graphs open side by side and
            # a start takes about as long as the largest graph, at the same peak memory (docs/benchmarks.md). The
            # first error in `names` order is raised
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

    def set_opener(self, opener: Callable[[str], GraphSession]) -> Callable[[str], GraphSession]:
        """Replaces how graphs open from now on; returns the previous opener. The exporter records the runs of
        graphs a low-memory pool opens and closes in turn (export/calibration.py)."""
        with self._lock:
            previous, self._opener = self._opener, opener
        return previous

    def close(self) -> None:
        with self._lock:
            self._open.clear()
        gc.collect()
