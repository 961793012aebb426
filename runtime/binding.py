"""I/O binding and captured graphs (CUDA graphs) for GPU providers.

A bound graph keeps its inputs and outputs in device buffers at fixed addresses: each call copies the new
feeds into them and the outputs back, and no buffer is allocated per call. Fixed addresses are what a
captured graph needs: onnxruntime records the graph's kernel launches once and replays them in one launch,
which removes the per-kernel launch cost that dominates small graphs (the text encoder) on fast GPUs.

Hand-written over onnxruntime's IOBinding and OrtValue: onnxruntime's own helper
(onnxruntime.transformers.io_binding_helper) needs torch, which the runtime never imports.

Capture needs every node of a graph on the GPU. With symbolic dimensions onnxruntime computes shapes on
the CPU and copies them over (Memcpy nodes), and refuses to capture; so a captured graph is a session
opened for one input shape, its free dimensions fixed (`static_dims`), where those shape computations fold
away. See shape_sessions.py.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

from .session_states import BindingState

# onnxruntime's run option naming the captured graph a run replays; -1 runs without capture
GRAPH_ID_ENTRY = "gpu_graph_id"
NO_CAPTURE = -1


def shape_key(feeds: dict[str, np.ndarray]) -> tuple:
    """What a bound or captured graph is specific to: each input's shape and dtype."""
    return tuple((name, tuple(value.shape), value.dtype.str) for name, value in sorted(feeds.items()))


def static_dims(inputs: dict[str, "ort.NodeArg"], feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """Each symbolic input dimension's size in these feeds (`batch_size` -> 1, `height` -> 64, ...), for
    SessionOptions.add_free_dimension_override_by_name. A dimension given two sizes cannot be fixed."""
    dims: dict[str, int] = {}
    for name, arg in inputs.items():
        for want, got in zip(arg.shape, feeds[name].shape):
            if isinstance(want, str) and want:
                if dims.setdefault(want, int(got)) != int(got):
                    raise ValueError(f"dimension {want!r} is {dims[want]} in one input and {got} in another")
    return dims


def _contiguous(value: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns a 0-d array (the UNet's timestep) into shape (1,)
    return value if value.flags.c_contiguous else value.copy(order="C")


class DeviceUnsupported(RuntimeError):
    """This onnxruntime build cannot place buffers on the provider's device (its Python binding lacks it)."""


class Binding:
    """Whether a graph's runs go through I/O binding on its provider's device (`device_type`; None: host memory,
    nothing to bind), and the runners that do it. A build that cannot place buffers there refuses it for good."""

    def __init__(self, device_type: str | None, device_id: int = 0, wanted: bool = True):
        self.device_type = device_type
        self.device_id = device_id
        self.state = BindingState.ON if device_type and wanted else BindingState.OFF
        self.refusal = ""  # why, once REFUSED

    @property
    def on(self) -> bool:
        return self.state is BindingState.ON

    @property
    def text(self) -> str:
        """As the provider report says it: "on", "off" or "refused: <why>"."""
        return self.state.with_detail(self.refusal)

    def runner(self, session: ort.InferenceSession, graph_id: int | None = None) -> "BoundRunner | None":
        """The session's bound runner (replaying captured graph `graph_id`), or None where runs go unbound."""
        return BoundRunner(session, self.device_type, self.device_id, graph_id) if self.on else None

    def refuse(self, reason: str) -> None:
        self.state, self.refusal = BindingState.REFUSED, reason


class BoundRunner:
    """Runs one session through I/O binding on `device_type` (an OrtValue device: "cuda", or "cpu" in tests).

    `graph_id`: replay the captured graph of that id (the session must have been opened with its provider's
    capture option); None: bound runs without capture. The first run of an input shape binds fresh buffers
    and runs uncaptured, which also tells the outputs' shapes; later runs of that shape reuse the buffers.
    One call at a time: the buffers are shared.
    """

    def __init__(
        self, session: ort.InferenceSession, device_type: str, device_id: int = 0, graph_id: int | None = None
    ):
        self.session = session
        self.device_type = device_type
        self.device_id = device_id
        self.graph_id = graph_id
        self.output_names = [o.name for o in session.get_outputs()]
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._binding: ort.IOBinding | None = None
        self._inputs: dict[str, ort.OrtValue] = {}
        self._outputs: list[ort.OrtValue] = []
        self.replays = 0  # runs served by an existing binding (replays of the captured graph when graph_id is set)

    def run(self, feeds: dict[str, np.ndarray], run_options: ort.RunOptions | None = None) -> list[np.ndarray]:
        run_options = run_options or ort.RunOptions()
        key = shape_key(feeds)
        with self._lock:
            if key != self._key:
                return self._bind_and_run(key, feeds, run_options)
            for name, value in feeds.items():
                self._inputs[name].update_inplace(_contiguous(value))
            if self.graph_id is not None:
                run_options.add_run_config_entry(GRAPH_ID_ENTRY, str(self.graph_id))
            self.session.run_with_iobinding(self._binding, run_options)
            self.replays += 1
            return self._to_host(self._outputs)

    def _to_host(self, values: list[ort.OrtValue]) -> list[np.ndarray]:
        # a device OrtValue's numpy() is a fresh host copy; a host one's is a view of the buffer the next run
        # overwrites, so it is copied
        return [v.numpy().copy() if self.device_type == "cpu" else v.numpy() for v in values]

    def _bind_and_run(self, key: tuple, feeds: dict[str, np.ndarray], run_options: ort.RunOptions) -> list[np.ndarray]:
        self._key = None  # until this shape is bound whole
        binding = self.session.io_binding()
        inputs = {}
        for name, value in feeds.items():
            # a copy: on the host an OrtValue wraps the array it is made from, and update_inplace would then
            # write later feeds into the caller's array
            try:
                inputs[name] = ort.OrtValue.ortvalue_from_numpy(value.copy(order="C"), self.device_type, self.device_id)
            except Exception as exc:  # onnxruntime's own types: "Can't allocate memory on the device ..."
                raise DeviceUnsupported(str(exc)) from exc
            binding.bind_ortvalue_input(name, inputs[name])
        for name in self.output_names:  # onnxruntime allocates them this once; their shapes are not known before
            binding.bind_output(name, self.device_type, self.device_id)
        if self.graph_id is not None:
            run_options.add_run_config_entry(GRAPH_ID_ENTRY, str(NO_CAPTURE))
        self.session.run_with_iobinding(binding, run_options)
        results = self._to_host(binding.get_outputs())
        # fixed output buffers from now on: a captured graph writes to the addresses it was captured with
        outputs = [
            ort.OrtValue.ortvalue_from_shape_and_type(r.shape, r.dtype.type, self.device_type, self.device_id)
            for r in results
        ]
        binding.clear_binding_outputs()
        for name, value in zip(self.output_names, outputs):
            binding.bind_ortvalue_output(name, value)
        self._binding, self._inputs, self._outputs, self._key = binding, inputs, outputs, key
        return results
