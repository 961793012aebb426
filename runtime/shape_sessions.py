"""The session a graph runs on now: its one dynamic session, or one session per input shape.

Captured graphs (CUDA graphs) need every node on the GPU, which symbolic dimensions prevent (binding.py), and NPU
compilers take fixed shapes only (`Provider.static_shapes`): for those, each new input shape reopens the graph with
its dimensions fixed, replacing the previous session so that one copy of the weights stays on the device. A shape
onnxruntime will not open that way runs on the dynamic session (bound, uncaptured), and is not tried again.
"""

from __future__ import annotations

import gc
import logging
import threading

import numpy as np
import onnxruntime as ort

from .binding import Binding, BoundRunner, DeviceUnsupported, shape_key, static_dims
from .errors import EdgediffError
from .graph_loader import GraphLoader, summarize
from .session_states import CacheStatus, CaptureState, ShapeState

log = logging.getLogger("edgediff.session")


def dims_text(key: tuple) -> str:
    """A shape key (binding.shape_key) as the report says it: "sample 1x4x8x8, timestep scalar"."""
    return ", ".join(f"{name} {'x'.join(map(str, shape)) or 'scalar'}" for name, shape, _dtype in key)


class ShapeSessions:
    """One graph's current session, its bound runner (binding.py) and where it came from (`cache`).

    `per_shape`: a session per input shape, as above; `capture`: those sessions replay captured graphs.
    Otherwise the dynamic session serves every shape.
    """

    def __init__(
        self, name: str, loader: GraphLoader, binding: Binding, per_shape: bool = False, capture: bool = False
    ):
        self.name = name
        self.per_shape = per_shape or capture
        self.capture = capture
        self._loader = loader
        self._binding = binding
        self.state = ShapeState.DYNAMIC
        self._key: tuple | None = None  # the input shape of the shape-fixed session in use, or the refused one
        self._refused: dict[tuple, str] = {}  # input shape -> why onnxruntime would not open it fixed
        self._lock = threading.Lock()
        self.session: ort.InferenceSession | None = None
        self.runner: BoundRunner | None = None
        self.cache = CacheStatus.OFF
        self._use(*loader.open_dynamic())
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def shapes(self) -> str:
        """As the provider report says it: "dynamic", "fixed <dims>" or "refused: <why>"."""
        return self.state.with_detail(self._detail())

    @property
    def captured(self) -> CaptureState:
        if not self.capture or self.state is ShapeState.DYNAMIC:
            return CaptureState.OFF
        return CaptureState.CAPTURED if self.state is ShapeState.FIXED else CaptureState.REFUSED

    @property
    def capture_state(self) -> str:
        """As the provider report says it: "off", "captured <dims>" or "refused: <why>"."""
        captured = self.captured
        return captured.with_detail("" if captured is CaptureState.OFF else self._detail())

    def _detail(self) -> str:
        if self.state is ShapeState.FIXED:
            return dims_text(self._key)
        return self._refused[self._key] if self.state is ShapeState.REFUSED else ""

    def run(
        self, feeds: dict[str, np.ndarray], run_options: ort.RunOptions | None, bound: bool = True
    ) -> list[np.ndarray]:
        """`bound=False`: a plain run even where I/O binding is on (onnxruntime's bound runs ignore active LoRA
        adapters)."""
        if not self.per_shape:
            return self._run(feeds, run_options, bound)
        with self._lock:  # one call at a time: a new shape swaps the session under the lock
            self._follow(shape_key(feeds), feeds)
            return self._run(feeds, run_options, bound)

    def _run(self, feeds: dict[str, np.ndarray], run_options, bound: bool = True) -> list[np.ndarray]:
        runner = self.runner if bound else None
        if runner is not None:
            try:
                return runner.run(feeds, run_options)
            except DeviceUnsupported as exc:
                # this onnxruntime build cannot place buffers on the provider's device (DirectML's Python binding
                # came in onnxruntime 1.17): run unbound, and say so. Any other failure is the run's own and is
                # raised as it is
                reason = summarize(exc)
                log.warning(
                    "%s: I/O binding on %r failed (%s); it runs unbound", self.name, self._binding.device_type, reason
                )
                self._binding.refuse(reason)
                self.runner = None
        return self.session.run(self.output_names, feeds, run_options)

    def _follow(self, key: tuple, feeds: dict[str, np.ndarray]) -> None:
        """Puts in place the session for this input shape."""
        if key in self._refused:
            self._use_dynamic()
            self.state, self._key = ShapeState.REFUSED, key
        elif self.state is not ShapeState.FIXED or key != self._key:
            self._open_fixed(key, feeds)

    def _open_fixed(self, key: tuple, feeds: dict[str, np.ndarray]) -> None:
        """Replaces the session by one fixed to these feeds' shapes (captured, when capturing)."""
        try:
            dims = static_dims(self.inputs, feeds)
            self._drop()  # the previous session's device memory goes before the next session takes its own
            session, cache = self._loader.open(dims, capture=self.capture)
        except EdgediffError:
            raise
        except Exception as exc:  # onnxruntime's own types; e.g. "cannot use the graph capture feature"
            reason = summarize(exc)
            log.warning(
                "%s: no %s graph for %s (%s); it runs on the dynamic one%s",
                self.name,
                "captured" if self.capture else "shape-fixed",
                dims_text(key),
                reason,
                ", bound, without capture" if self.capture else "",
            )
            self._refused[key] = reason
            self._use_dynamic()
            self.state, self._key = ShapeState.REFUSED, key
            return
        self._use(session, cache, graph_id=0 if self.capture else None)
        self.state, self._key = ShapeState.FIXED, key
        log.info("%s: %s", self.name, self.capture_state if self.capture else self.shapes)

    def _use_dynamic(self) -> None:
        if self.session is not None and self.state is not ShapeState.FIXED:
            return  # the dynamic session is the one in use
        self._drop()
        self._use(*self._loader.open_dynamic())

    def _use(self, session: ort.InferenceSession, cache: CacheStatus, graph_id: int | None = None) -> None:
        self.session, self.cache = session, cache
        if self._loader.refused and self._binding.on:  # it runs on the CPU provider: nothing on a device to bind
            self._binding.refuse("the graph runs on the CPU")
        self.runner = self._binding.runner(session, graph_id)

    def _drop(self) -> None:
        self.session = self.runner = None
        gc.collect()
