"""The `ov` provider: a bundle's ONNX graphs compiled and run by OpenVINO's own runtime (the `openvino` package),
behind GraphSession's interface, so that the pipeline, its samplers and its checks are shared with onnxruntime.

Why beside onnxruntime's `openvino` provider: OpenVINO's CPU plugin computes in bf16 on CPUs with AVX-512 BF16 or
AMX (its default there), with AMX 2-3x onnxruntime's fp32 speed on the full-size UNet, and onnxruntime-openvino
fails on today's fastest bundles (docs/benchmarks.md, "OpenVINO's own runtime"). OpenVINO reads the ONNX graph itself, so no
onnxruntime build is replaced: it installs beside the CPU one.

Each graph is compiled once with its dynamic dimensions and runs every image size; OpenVINO's compiled-model cache
(CACHE_DIR, a folder of the graph cache) spares later starts the compile. Calls on one graph take turns (an infer
request runs one call at a time).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import lora_adapters
from .errors import BundleError, EdgediffError, InputError
from .external_data import check_external_data
from .graph_loader import summarize
from .input_check import InputCheck, check_manifest
from .manifest import ComponentSpec
from .session_config import physical_cores
from .session_states import CacheStatus

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
    options = dict(options)
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
    """One graph compiled by OpenVINO. `cache_folder`: OpenVINO's own cache of compiled graphs (None: no cache)."""

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ComponentSpec,
        bundle_path,
        options: dict,
        threads: int | None = None,
        cache_folder: Path | None = None,
    ):
        self.name = name
        # OpenVINO's ONNX reader follows a graph's external-data paths wherever they point: a bundle is data, so
        # they are checked to stay in the bundle folder first (onnxruntime refuses them itself)
        check_external_data(path, bundle_path)
        self.device, config = compile_config(options, spec.precision, threads, cache_folder)
        # compiled from the file, not a model read first: with a cache hit OpenVINO skips reading the ONNX graph
        self.compiled = core().compile_model(str(path), self.device, config)
        declared_inputs = {t.name for t in spec.inputs}
        self.inputs = {}
        for i in self.compiled.inputs:
            kind = i.get_element_type()
            shape = [d.get_length() if d.is_static else f"d{k}" for k, d in enumerate(i.get_partial_shape())]
            arg = GraphInput(_name(i, declared_inputs), _TYPES.get(kind.get_type_name(), str(kind)), shape)
            self.inputs[arg.name] = arg
        check_manifest(name, spec, self.inputs, bundle_path)
        self.check_inputs = InputCheck(name, self.inputs)
        declared_outputs = {t.name for t in spec.outputs}
        self.output_names = [_name(o, declared_outputs) for o in self.compiled.outputs]
        self.cache = CacheStatus.PROVIDER if cache_folder is not None else CacheStatus.OFF
        self._request = self.compiled.create_infer_request()
        self._outputs = list(self.compiled.outputs)  # in output_names' order
        self._turn = threading.Lock()
        log.info(
            "%s: compiled by OpenVINO for %s (inference precision %s)", name, self.device, self.inference_precision
        )

    @property
    def inference_precision(self) -> str:
        """The precision OpenVINO computes in (bf16 on CPUs with AVX-512 BF16 or AMX unless told otherwise)."""
        try:
            return self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        except RuntimeError:  # a device without the property
            return "device default"

    @property
    def providers(self) -> list[str]:
        return [f"OpenVINO {self.device} ({self.inference_precision})"]

    fell_back_to_cpu = False  # a graph OpenVINO refuses opens as a GraphSession on the CPU provider instead

    def run(self, run_options=None, **feeds) -> list[np.ndarray]:
        if lora_adapters.has_active(self.name):  # onnxruntime's adapters: OpenVINO has no such inputs
            raise InputError("lora_provider", provider="ov", component=self.name)
        feeds = self.check_inputs(feeds)
        with self._turn:
            result = self._request.infer(feeds)  # outputs are copies (share_outputs=False)
        return [np.asarray(result[o]) for o in self._outputs]


def open_or_refuse(
    name: str, bundle, spec: ComponentSpec, resolution, threads: int | None, cache_folder: Path | None
) -> tuple[OpenVINOSession | None, str]:
    """The graph compiled by OpenVINO, or (with the caller's --fallback) None and why OpenVINO refused it: the
    pipeline then opens it on onnxruntime's CPU provider, logged and in its provider report."""
    path = bundle.file(spec.graph_file)
    folder = cache_folder / resolution.provider.cache_folder if cache_folder is not None else None
    try:
        return OpenVINOSession(name, path, spec, bundle.path, resolution.options, threads, folder), ""
    except EdgediffError:
        raise  # ours already says what is wrong (a graph's weights outside the bundle, inputs unlike its manifest)
    except Exception as exc:  # OpenVINO raises RuntimeError and its own types, with its reason at the end
        why = summarize(exc)
        if not resolution.fallback:
            raise BundleError("graph_uncompilable", path=bundle.path, file=path.name, detail=why) from exc
        log.warning("%s: OpenVINO cannot compile this graph (%s); it runs on onnxruntime's CPU provider", name, why)
        return None, why
