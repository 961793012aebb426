"""The `ov` provider: a bundle's ONNX graphs compiled and run by OpenVINO's own runtime (the `openvino` package),
behind GraphSession's interface, so that the pipeline, its samplers and its checks are shared with onnxruntime.

Why beside onnxruntime's `openvino` provider: OpenVINO's CPU plugin computes in bf16 on CPUs with AVX-512 BF16 or
AMX (its default there), with AMX 2-3x onnxruntime's fp32 speed on the full-size UNet, and onnxruntime-openvino
fails on today's fastest bundles (docs/benchmarks.md, "OpenVINO's own runtime"). OpenVINO reads the ONNX graph itself, so no
onnxruntime build is replaced: it installs beside the CPU one.

Each graph is read when the pipeline opens (an operator OpenVINO cannot read is found then) and compiled for each
input shape as calls bring it: so compiled, the full-size SD-Turbo UNet in bf16 took 12% less time than compiled
with its dimensions dynamic (docs/benchmarks.md, "OpenVINO's own runtime"), at a compile per new image size. One
compiled form is kept at a time, as onnxruntime's per-shape sessions do (shape_sessions.py). The provider option
`shapes=dynamic` compiles each graph once, as it opens, for every size. OpenVINO's compiled-model cache (CACHE_DIR,
a folder of the graph cache) spares later starts the compile. Calls on one graph take turns (an infer request runs
one call at a time).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import lora_adapters
from .binding import shape_key
from .errors import BundleError, EdgediffError, InputError, ProviderError
from .external_data import check_external_data
from .graph_loader import summarize
from .input_check import InputCheck, check_manifest
from .manifest import ComponentSpec
from .session_config import physical_cores
from .session_states import CacheStatus, ShapeState
from .shape_sessions import dims_text

log = logging.getLogger("edgediff.session")

# OpenVINO's element type names -> the onnxruntime type strings InputCheck reads (input_check.ORT_TO_NUMPY)
_TYPES = {
    "f32": "tensor(float)",
    "f16": "tensor(float16)",
    "f64": "tensor(double)",
    "i64": "tensor(int64)",
    "i32": "tensor(int32)",
}
DEVICE_OPTION = "device_type"  # the provider option naming OpenVINO's device ("CPU", "GPU", "NPU", "AUTO:GPU,CPU")
# the provider option saying how graphs are compiled: "static" for each input shape as it comes (the default: faster
# calls in bf16, docs/benchmarks.md), "dynamic" once for every shape (no compile when the image size changes)
SHAPES_OPTION = "shapes"
SHAPES = ("static", "dynamic")


@dataclass(frozen=True)
class GraphInput:
    """One input as InputCheck reads it (onnxruntime's NodeArg has the same fields): its name, type string, and
    shape with an int for a fixed dimension and a name for a dynamic one."""

    name: str
    type: str
    shape: list


@functools.lru_cache(maxsize=1)
def core():
    """One OpenVINO Core per process: it holds the plugins, loaded once."""
    import openvino as ov

    return ov.Core()


def compile_config(options: dict, precision: str, threads: int | None, cache_folder: Path | None) -> tuple[str, dict]:
    """OpenVINO's device and compile properties for a graph of the bundle precision `precision`: a latency hint on
    the physical cores (as onnxruntime's sessions get), the compiled-model cache where the graph cache is on, and
    the caller's provider options over them (any of OpenVINO's properties, INFERENCE_PRECISION_HINT among them).

    A quantised graph computes its float parts in f32 on the CPU: they are what the export kept in fp32 for
    quality and checked that way, and bf16 there lost the shipped model's images (docs/benchmarks.md). An fp32
    graph gets the CPU plugin's own default: bf16 where the CPU has AVX-512 BF16 or AMX, f32 elsewhere."""
    options = {k: v for k, v in options.items() if k != SHAPES_OPTION}  # ours, not OpenVINO's
    device = options.pop(DEVICE_OPTION, "CPU")
    config = {"PERFORMANCE_HINT": "LATENCY"}
    if device == "CPU":  # a GPU or NPU has no CPU threads to set
        config["INFERENCE_NUM_THREADS"] = str(threads or physical_cores())
        if precision != "fp32":
            config["INFERENCE_PRECISION_HINT"] = "f32"
    if cache_folder is not None:
        config["CACHE_DIR"] = str(cache_folder)
    return device, {**config, **options}


def _name(port, declared: set[str]) -> str:
    """A graph input's or output's name as the manifest declares it: OpenVINO gives a tensor every name it had in
    the graph (T5's last_hidden_state is also an inner node's output), and any one of them by default."""
    names = port.get_names()
    return next((n for n in sorted(names) if n in declared), port.get_any_name())


class OpenVINOSession:
    """One graph read by OpenVINO and compiled for each input shape it is called with (or once, dynamic, with the
    provider option shapes=dynamic). `cache_folder`: OpenVINO's own cache of compiled graphs (None: no cache).
    `on_cpu`: where the caller allows fallbacks, called with OpenVINO's reason when it compiles the graph for a
    call neither fixed nor dynamic; it returns the session that then runs the graph (onnxruntime's CPU provider)."""

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ComponentSpec,
        bundle_path,
        options: dict,
        threads: int | None = None,
        cache_folder: Path | None = None,
        on_cpu=None,
    ):
        self.name = name
        self.path = path
        self._on_cpu = on_cpu
        self._cpu = None  # the CPU provider's session, where OpenVINO failed the graph at a call (on_cpu)
        self.refusal = ""
        shapes = options.get(SHAPES_OPTION, SHAPES[0])
        if shapes not in SHAPES:
            raise ProviderError("provider_option_value", option=SHAPES_OPTION, value=shapes, allowed=", ".join(SHAPES))
        # OpenVINO's ONNX reader follows a graph's external-data paths wherever they point: a bundle is data, so
        # they are checked to stay in the bundle folder first (onnxruntime refuses them itself)
        check_external_data(path, bundle_path)
        self.device, self._config = compile_config(options, spec.precision, threads, cache_folder)
        # read now, so that an operator OpenVINO cannot read refuses the graph as the pipeline opens (its weights
        # stay in the bundle's files, mapped, not read); kept for the first compile only (_compile)
        self._model = core().read_model(str(path))
        declared_inputs = {t.name for t in spec.inputs}
        self.inputs = {}
        for i in self._model.inputs:
            kind = i.get_element_type()
            shape = [d.get_length() if d.is_static else f"d{k}" for k, d in enumerate(i.get_partial_shape())]
            arg = GraphInput(_name(i, declared_inputs), _TYPES.get(kind.get_type_name(), str(kind)), shape)
            self.inputs[arg.name] = arg
        check_manifest(name, spec, self.inputs, bundle_path)
        self.check_inputs = InputCheck(name, self.inputs)
        declared_outputs = {t.name for t in spec.outputs}
        self.output_names = [_name(o, declared_outputs) for o in self._model.outputs]
        self.cache = CacheStatus.PROVIDER if cache_folder is not None else CacheStatus.OFF
        self.per_shape = shapes == "static"
        self.state = ShapeState.PENDING
        self._key: tuple | None = None  # the input shape compiled for, or the one refused
        self._refused: dict[tuple, str] = {}  # input shape -> why OpenVINO would not compile the graph fixed to it
        self._compiled = self._request = None
        self._outputs: list = []
        self._turn = threading.Lock()
        if not self.per_shape:
            self._compile(None)
            self.state = ShapeState.DYNAMIC

    def _compile(self, key: tuple | None) -> None:
        """Compiles the graph fixed to the input shapes of `key` (binding.shape_key), or with its dimensions dynamic
        (None), and makes it the graph's current form; the previous one is dropped first (one copy of the weights in
        OpenVINO's layout at a time). Nothing is left half in place if it raises: no form at all."""
        self._compiled = self._request = None
        if key is None:
            # from the file: on a cache hit OpenVINO then neither reads the graph nor touches its weights
            self._model = None
            compiled = core().compile_model(str(self.path), self.device, self._config)
        else:
            # a graph read afresh for each shape (0.1-0.2 s for the full-size UNet), not held: OpenVINO hashes an
            # in-memory graph's weights to find it in its cache, and holding the graph would keep those pages of the
            # weight files resident beside the cached form (3.4 GB more for the fp32 UNet)
            model, self._model = self._model or core().read_model(str(self.path)), None
            model.reshape({name: list(shape) for name, shape, _dtype in key})
            compiled = core().compile_model(model, self.device, self._config)
        request = compiled.create_infer_request()
        self._outputs = list(compiled.outputs)  # in output_names' order
        self._compiled, self._request = compiled, request
        log.info(
            "%s: compiled by OpenVINO for %s (%s, %s)",
            self.name,
            self.device,
            self.inference_precision,
            "dynamic" if key is None else dims_text(key),
        )

    def _follow(self, key: tuple) -> None:
        """Puts in place the graph compiled for this input shape: fixed to it, or dynamic where OpenVINO refused
        that; a shape refused once is not tried fixed again."""
        if key in self._refused:
            if self.state is not ShapeState.REFUSED or self._request is None:
                self._compile_dynamic(key)
            else:  # the dynamic form is in place already
                self._key = key
            return
        if self.state is ShapeState.FIXED and key == self._key and self._request is not None:
            return
        try:
            self._compile(key)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types, with its reason at the end
            why = summarize(exc)
            log.warning(
                "%s: OpenVINO cannot compile it for %s (%s); it runs compiled dynamic", self.name, dims_text(key), why
            )
            self._refused[key] = why
            self._compile_dynamic(key)
            return
        self.state, self._key = ShapeState.FIXED, key

    def _compile_dynamic(self, key: tuple) -> None:
        """The graph compiled with its dimensions dynamic, for a call whose shapes (`key`) OpenVINO refused. Where it
        refuses that too, the graph runs on the CPU provider from now on where the caller allows fallbacks
        (`on_cpu`), else the call fails."""
        try:
            self._compile(None)
        except Exception as exc:
            why = summarize(exc)
            if self._on_cpu is None:
                raise BundleError(
                    "graph_uncompilable_for_call",
                    path=self.path.parent,
                    file=self.path.name,
                    dims=dims_text(key),
                    detail=why,
                ) from exc
            log.warning(
                "%s: OpenVINO cannot compile this graph (%s); it runs on onnxruntime's CPU provider", self.name, why
            )
            self.refusal = why
            self._cpu = self._on_cpu(why)
            return
        self.state, self._key = ShapeState.REFUSED, key

    @property
    def shapes(self) -> str:
        """As the provider report says it: "not compiled yet", "dynamic", "fixed <dims>" or "refused: <why>"."""
        if self._cpu is not None:
            return ShapeState.REFUSED.with_detail(self.refusal)
        state, key = self.state, self._key
        if state is ShapeState.FIXED:
            return state.with_detail(dims_text(key))
        return state.with_detail(self._refused.get(key, "") if state is ShapeState.REFUSED else "")

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO computes in (bf16 on CPUs with AVX-512 BF16 or AMX unless told otherwise)."""
        compiled = self._compiled
        try:
            if compiled is None:  # nothing compiled now: what it will be compiled with
                asked = self._config.get("INFERENCE_PRECISION_HINT")
                return asked or core().get_property(self.device, "INFERENCE_PRECISION_HINT").get_type_name()
            return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        except RuntimeError:  # a device without the property
            return "device default"

    @property
    def providers(self) -> list[str]:
        if self._cpu is not None:
            return self._cpu.providers
        return [f"OpenVINO {self.device} ({self.inference_precision})"]

    @property
    def fell_back_to_cpu(self) -> bool:
        """OpenVINO failed the graph at a call and the caller allowed fallbacks: it runs on the CPU provider. (A graph
        OpenVINO cannot read opens as a GraphSession on the CPU provider instead: open_or_refuse.)"""
        return self._cpu is not None

    def run(self, run_options=None, **feeds) -> list[np.ndarray]:
        if lora_adapters.has_active(self.name):  # onnxruntime's adapters: OpenVINO has no such inputs
            raise InputError("lora_provider", provider="ov", component=self.name)
        feeds = self.check_inputs(feeds)
        with self._turn:  # one call at a time: a new shape swaps the compiled graph under the lock
            if self._cpu is None and self.per_shape:
                self._follow(shape_key(feeds))
            if self._cpu is not None:
                return self._cpu.run(run_options, **feeds)
            result = self._request.infer(feeds)  # outputs are copies (share_outputs=False)
            return [np.asarray(result[o]) for o in self._outputs]


def open_or_refuse(
    name: str, bundle, spec: ComponentSpec, resolution, threads: int | None, cache_folder: Path | None, on_cpu=None
) -> tuple[OpenVINOSession | None, str]:
    """The graph read by OpenVINO (compiled too, with shapes=dynamic), or (with the caller's --fallback) None and
    why OpenVINO refused it: the pipeline then opens it on onnxruntime's CPU provider, logged and in its provider
    report. `on_cpu`: OpenVINOSession's, for a graph OpenVINO fails at a call; passed on with --fallback only."""
    path = bundle.file(spec.graph_file)
    folder = cache_folder / resolution.provider.cache_folder if cache_folder is not None else None
    on_cpu = on_cpu if resolution.fallback else None
    try:
        return OpenVINOSession(name, path, spec, bundle.path, resolution.options, threads, folder, on_cpu), ""
    except EdgediffError:
        raise  # ours already says what is wrong (a graph's weights outside the bundle, inputs unlike its manifest)
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types, with its reason at the end
        why = summarize(exc)
        if not resolution.fallback:
            raise BundleError("graph_uncompilable", path=bundle.path, file=path.name, detail=why) from exc
        log.warning(
            "%s: OpenVINO cannot read or compile this graph (%s); it runs on onnxruntime's CPU provider", name, why
        )
        return None, why
