"""Execution providers: one small class each (how it is detected, its session and provider options,
the bundle precisions that suit it), the order `auto` tries them in, and a logged, explicit fallback.

Only the CPU provider is exercised on our CI; the others are built from onnxruntime's documented
options and verified where a machine has them (see README "Platforms").
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import onnxruntime as ort

from . import cpu_features, ort_builds, provider_loading
from .errors import ProviderError

log = logging.getLogger("edgediff.providers")


@dataclass(frozen=True)
class Provider:
    name: str  # our short name (CLI, API)
    ort_name: str  # onnxruntime's provider name
    precisions: tuple[str, ...]  # bundle precisions that suit it, best first
    extra: str  # the edgediff extra that installs the onnxruntime build having it (pyproject.toml)
    needs: str = ""  # what else it needs beyond that build (drivers, SDKs)
    platforms: tuple[str, ...] = ()  # sys.platform prefixes where it can exist; () = everywhere
    options: dict = field(default_factory=dict)  # provider options passed to onnxruntime
    gpu: bool = False  # device memory: fp16 pays off
    cuda_kernels: bool = False  # runs onnxruntime's CUDA-only fused operators (bundles from `export --optimize gpu`)
    # where I/O binding puts a graph's inputs and outputs (onnxruntime's OrtValue device name); None: host memory
    device_type: str | None = None
    # the provider option that records a graph's kernel launches once and replays them (CUDA graphs); None: no such thing
    graph_capture_option: str | None = None
    # the provider compiles the nodes it takes (OpenVINO, TensorRT, MIGraphX, Core ML, QNN): onnxruntime cannot
    # save such a graph (graph_cache.py), so these use their own caches instead, where they have one (`cache_option`)
    compiles: bool = False
    # the provider option naming the folder a compiling provider keeps its compiled cache in; that folder is
    # `cache_folder` inside the graph cache, which lists, evicts and clears it with the rest. None: no such cache
    cache_option: str | None = None
    # the Python module of a plugin package (onnxruntime 1.23+ loads such a provider from a library it is given,
    # and takes it through the session options' devices, not by name); None: the provider is built in
    plugin: str | None = None
    # a compiling provider that can write what it compiled as an EPContext model (onnxruntime's ep.context_* session
    # entries): the graph cache keeps that model like an optimized graph, and the next start skips the compiler
    saves_context: bool = False
    # compiles for fixed shapes only (NPUs): each graph is reopened with its dimensions fixed for each new input shape
    # (shape_sessions.py); with symbolic ones the QNN provider validated next to nothing ("Cannot get shape")
    static_shapes: bool = False
    # a pipeline may open its graphs side by side (session.py SessionPool): only where that was checked. DirectML
    # is reported to crash with sessions used from several threads; compilers (OpenVINO, TensorRT) each want memory
    # and every core; CUDA is not yet checked on a GPU
    opens_in_parallel: bool = False
    # takes a graph whole only where every operator is ONNX's own: onnxruntime's (FastGelu, MultiHeadAttention,
    # MatMulNBits) split it between this provider and the CPU's, which onnxruntime-openvino 1.24 fails at run time
    standard_ops_only: bool = False
    # what runs its graphs: onnxruntime, or OpenVINO's own runtime (runtime/openvino_session.py), for which `ort_name`
    # and `extra` name no onnxruntime build
    runtime: str = "onnxruntime"

    @property
    def install(self) -> str:
        """How to get it, for messages."""
        return f'pip install "edgediff[{self.extra}]"' + (f" ({self.needs})" if self.needs else "")

    @property
    def cache_folder(self) -> str | None:
        """The folder inside the graph cache where it keeps its own compiled cache: named after the provider."""
        return self.name if self.cache_option else None

    @property
    def can_capture(self) -> bool:
        """Whether it can replay captured graphs: it has a capture option and binds to device memory."""
        return bool(self.graph_capture_option and self.device_type)

    def available(self, offered: set[str] | None = None) -> bool:
        if offered is None:
            offered = set(ort.get_available_providers())
            if self.plugin and importlib.util.find_spec(self.plugin) is not None:  # registered on first use
                return True
        return self.ort_name in offered

    def on_this_platform(self) -> bool:
        return not self.platforms or sys.platform.startswith(self.platforms)

    def configure(self, opts: ort.SessionOptions) -> None:
        """Session options this provider needs (most need none)."""

    def provider_options(self) -> dict:
        """The provider options for onnxruntime on this machine (most are fixed)."""
        return dict(self.options)

    def cache_options(self, folder) -> dict:
        """Provider options that keep a compiling provider's own cache inside the graph cache `folder`."""
        return {self.cache_option: str(folder / self.cache_folder)} if self.cache_option else {}

    def auto_eligible(self, precision: str | None = None) -> bool:
        """Whether `auto` may pick it when it is available, for a bundle whose denoiser has this precision (None:
        any bundle); measured reasons where it may not."""
        return True

    def load_hint(self, precision: str) -> str:
        """What to do when onnxruntime cannot load a graph of this precision on it ("" where nothing known helps)."""
        return ""

    def prepare(self) -> None:
        """Whatever the process needs before this provider's first session: a plugin's library registered."""
        if self.plugin:
            provider_loading.register_plugin(self.ort_name, self.plugin)


class DirectML(Provider):
    def configure(self, opts: ort.SessionOptions) -> None:
        # onnxruntime's DirectML notes: no memory patterns, sequential execution
        opts.enable_mem_pattern = False
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL


class OpenVINO(Provider):
    def provider_options(self) -> dict:
        # OpenVINO's AUTO device list must name only devices that are present: with "AUTO:GPU,NPU,CPU" on a
        # machine without an Intel GPU, onnxruntime 1.24 fails to create the provider and silently runs
        # every graph on its CPU provider instead (seen on an AMD EPYC with no Intel GPU or NPU).
        if ":" not in self.options["device_type"]:  # one named device: nothing to choose
            return dict(self.options)
        present = openvino_devices()
        if present is None:  # this build cannot say: let OpenVINO's AUTO choose among all it finds
            return {**self.options, "device_type": "AUTO"}
        kind, _, wanted = self.options["device_type"].partition(":")
        found = [d for d in wanted.split(",") if any(p.split(".")[0] == d for p in present)]
        if len(found) <= 1:  # nothing to choose: the device itself (AUTO:CPU failed to compile an int8-static
            return {**self.options, "device_type": found[0] if found else "CPU"}  # text encoder that CPU compiles)
        return {**self.options, "device_type": f"{kind}:{','.join(found)}"}

    def prepare(self) -> None:
        super().prepare()
        provider_loading.openvino_windows_libraries()

    def auto_eligible(self, precision: str | None = None) -> bool:
        # Picked by `auto` for an Intel GPU or NPU only. On a CPU alone it is a choice, not a default: it was no
        # faster than the CPU provider there except in bf16, with slower starts and more memory
        # (docs/benchmarks.md, "OpenVINO on a CPU").
        present = openvino_devices()
        return present is None or any(p.split(".")[0] in ("GPU", "NPU") for p in present)


class OpenVINORuntime(Provider):
    """OpenVINO's own runtime (runtime/openvino_session.py), not an onnxruntime provider: present where the
    `openvino` package is, beside any onnxruntime build."""

    def available(self, offered: set[str] | None = None) -> bool:
        if offered is not None:  # a caller's list of onnxruntime's providers (tests) says nothing of it
            return self.ort_name in offered
        return importlib.util.find_spec("openvino") is not None

    def auto_eligible(self, precision: str | None = None) -> bool:
        # Picked by `auto` for fp32 bundles on CPUs with AMX, where OpenVINO's CPU plugin computes them in bf16 on
        # the tile units: the full-size SD-Turbo image took less time than onnxruntime took with its fastest int8
        # bundle in three of four runs side by side, at a higher PSNR (docs/benchmarks.md, "OpenVINO's own
        # runtime"). Not on AVX-512 BF16 alone: its UNet call there was a wash with onnxruntime's int8-static one (a
        # Zen 4 EPYC) and its whole image slower than onnxruntime's fp32 one (the AMX Xeon with AMX hidden). Not for
        # quantised bundles (no faster, with slower starts), nor where AUTO_OV_ENV is 0.
        return precision in (None, "fp32") and amx_cpu() and os.environ.get(AUTO_OV_ENV, "1") != "0"


# "0": `auto` never picks OpenVINO's runtime, so fp32 bundles compute in fp32 wherever they run (the test suite sets it:
# its references are fp32)
AUTO_OV_ENV = "EDGEDIFF_AUTO_OV"


def amx_cpu() -> bool:
    """Whether this CPU has AMX's bf16 tile units, which OpenVINO's CPU plugin computes fp32 graphs on by default."""
    return "amx_bf16" in cpu_features.cpu_flags()


class CUDA(Provider):
    def prepare(self) -> None:
        super().prepare()
        provider_loading.preload_cuda_libraries()


class WebGPU(Provider):
    def load_hint(self, precision: str) -> str:
        # seen through a software Vulkan device: "Program Transpose requires f16 but the device does not support it"
        if precision != "fp16":
            return ""
        return (
            " (fp16 graphs need a GPU with WebGPU's shader-f16 feature; for one without it, export the bundle "
            "with --precision fp32)"
        )


@functools.lru_cache(maxsize=1)  # asked at each resolve and session open; the devices do not change in a process
def openvino_devices() -> list[str] | None:
    """The devices onnxruntime's OpenVINO build sees ("CPU", "GPU.0", "NPU", ...), or None if it cannot say."""
    provider_loading.openvino_windows_libraries()  # listing them loads the provider
    try:
        from onnxruntime.capi import _pybind_state
    except ImportError:
        return None
    lister = getattr(_pybind_state, "get_available_openvino_device_ids", None)
    return list(lister()) if lister else None


REGISTRY: dict[str, Provider] = {
    p.name: p
    for p in (
        # x86 CPUs have no fp16 kernels (onnxruntime inserts casts): fp32, or int8/int4 weights
        Provider("cpu", "CPUExecutionProvider", ("fp32", "int8", "int4"), extra="cpu", opens_in_parallel=True),
        CUDA(
            "cuda",
            "CUDAExecutionProvider",
            ("fp16", "fp32"),
            extra="cuda",
            platforms=("linux", "win"),
            gpu=True,
            cuda_kernels=True,
            device_type="cuda",
            graph_capture_option="enable_cuda_graph",
            options={"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True},
        ),
        CUDA(
            "tensorrt",
            "TensorrtExecutionProvider",
            ("fp16", "fp32"),
            compiles=True,
            cache_option="trt_engine_cache_path",  # its engines in our cache: else they land in the working directory
            extra="cuda",
            needs="and the TensorRT libraries",
            platforms=("linux", "win"),
            gpu=True,
            cuda_kernels=True,  # nodes TensorRT cannot take run on its CUDA fallback
            device_type="cuda",
            graph_capture_option="trt_cuda_graph_enable",
            options={"trt_fp16_enable": True, "trt_engine_cache_enable": True},
        ),
        # AMD GPUs (Linux, ROCm installed). onnxruntime 1.23 removed its ROCm provider in favour of MIGraphX, which
        # compiles the graphs it takes. Not run on AMD hardware: with the wheel but no ROCm, onnxruntime cannot load
        # the provider and every graph runs on the CPU, logged (checked with onnxruntime-migraphx 1.27.1). Its compiled
        # programs (.mxr) are cached, as compiling takes minutes at full size; the cache option is in AMD's
        # onnxruntime-migraphx 1.23.0 and 1.27.1 (read off their provider libraries)
        Provider(
            "migraphx",
            "MIGraphXExecutionProvider",
            ("fp16", "fp32"),
            compiles=True,
            cache_option="migraphx_model_cache_dir",
            extra="migraphx",
            needs="and AMD's ROCm",
            platforms=("linux",),
            gpu=True,
            options={"device_id": 0},
        ),
        # the same GPUs through onnxruntime 1.22 and older (onnxruntime-rocm); kept for those builds
        Provider(
            "rocm",
            "ROCMExecutionProvider",
            ("fp16", "fp32"),
            extra="rocm",
            needs="and AMD's ROCm",
            platforms=("linux",),
            gpu=True,
        ),
        # I/O binding on "dml" buffers: onnxruntime-directml 1.17+ (an older build fails the first bind, and the graph
        # then runs unbound, logged); built from onnxruntime's API, not yet run on Windows hardware
        DirectML(
            "directml",
            "DmlExecutionProvider",
            ("fp16", "fp32"),
            extra="directml",
            platforms=("win",),
            gpu=True,
            device_type="dml",
            options={"device_id": 0},
        ),
        # any GPU through WebGPU: Direct3D 12 on Windows, Metal on macOS, Vulkan on Linux (onnxruntime-webgpu: wheels
        # for Windows x64, macOS arm64, Linux x64). Its Python binding cannot place buffers on the device ("Can't
        # allocate memory on the device using this package", 1.27), so graphs run unbound. Checked on Linux through
        # a software Vulkan device (tests/runtime/test_webgpu.py); not yet on a GPU
        WebGPU("webgpu", "WebGpuExecutionProvider", ("fp16", "fp32"), extra="webgpu", gpu=True),
        Provider(
            "coreml",
            "CoreMLExecutionProvider",
            ("fp16", "fp32"),
            extra="cpu",
            needs="its macOS wheels have it",
            platforms=("darwin",),
            compiles=True,
            options={"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"},
        ),
        OpenVINO(
            "openvino",
            "OpenVINOExecutionProvider",
            ("fp16", "int8", "fp32"),
            extra="openvino",
            compiles=True,
            cache_option="cache_dir",  # its compiled blobs: the second start skips compilation
            options={"device_type": "AUTO:GPU,NPU,CPU"},
            standard_ops_only=True,
        ),
        # OpenVINO's own runtime (runtime/openvino_session.py): the `openvino` package beside the CPU build of
        # onnxruntime, which it does not replace. Its compiled graphs go in the graph cache's folder "ov"
        OpenVINORuntime(
            "ov",
            "OpenVINO",
            ("fp32", "int8"),
            extra="ov",
            compiles=True,
            cache_option="CACHE_DIR",
            options={"device_type": "CPU"},
            runtime="openvino",
        ),
        # Snapdragon NPUs (HTP). onnxruntime-qnn 2 is a plugin beside the CPU build; 1.x builds had it built in
        Provider(
            "qnn",
            "QNNExecutionProvider",
            ("int8", "fp16"),
            extra="qnn",
            compiles=True,
            plugin="onnxruntime_qnn",
            static_shapes=True,
            saves_context=True,
            platforms=("win", "linux"),
            options={"backend_type": "htp"},
        ),
    )
}
# kept for callers that only need names
PROVIDERS = {name: p.ort_name for name, p in REGISTRY.items()}
# `auto` picks the first available: GPUs, then NPUs, then the CPU. TensorRT is left to explicit
# choice (its engine build takes minutes on first use); QNN too (it wants QDQ int8 bundles); OpenVINO
# only where it sees an Intel GPU or NPU (OpenVINO.auto_eligible); OpenVINO's own runtime for fp32 bundles on CPUs
# with AMX (OpenVINORuntime.auto_eligible). Each GPU build of onnxruntime offers
# one GPU provider, so their order among themselves matters little; WebGPU comes after the native ones.
AUTO_ORDER = ("cuda", "migraphx", "rocm", "directml", "webgpu", "coreml", "openvino", "ov", "cpu")


def available(offered: set[str] | None = None) -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    return [name for name, p in REGISTRY.items() if p.available(offered)]


@dataclass(frozen=True)
class Resolution:
    """What a pipeline runs on: the chosen provider, and onnxruntime's provider list with options."""

    provider: Provider
    requested: str
    fell_back: bool
    overrides: dict = field(default_factory=dict)  # the caller's provider options, over the provider's own
    # the caller allows fallbacks: a graph the provider cannot take (compile or load) runs on the CPU provider instead
    # of failing the pipeline (graph_loader.py), logged and reported
    fallback: bool = False

    @property
    def options(self) -> dict:
        return {**self.provider.provider_options(), **self.overrides}

    def ort_providers_with(self, **extra) -> list:
        chosen = (self.provider.ort_name, {**self.options, **extra})
        return [chosen] + ([("CPUExecutionProvider", {})] if self.provider.name != "cpu" else [])

    @property
    def ort_providers(self) -> list:
        return self.ort_providers_with()

    @property
    def cache_tag(self) -> str:
        """The provider as the graph cache keys it: options such as prefer_nhwc change the optimized graph."""
        return f"{self.provider.name}-{_digest(self.overrides)}" if self.overrides else self.provider.name

    def cache_tag_fixed(self, fixed: dict) -> str:
        """The tag of a shape-fixed session: its fixed dimensions and capture option change the optimized graph."""
        return f"{self.cache_tag}-fixed{_digest(fixed)}"

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.ort_providers]


def _digest(values: dict) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def resolve(
    name: str = "auto",
    fallback: bool = False,
    offered: set[str] | None = None,
    options: dict | None = None,
    precision: str | None = None,
) -> Resolution:
    """The provider to use: `auto` -> best available; an unavailable explicit one is an error unless
    `fallback`, then the best available (logged); with `fallback` a graph the provider cannot take runs on the CPU
    provider. CPU always backs up nodes a provider cannot run.
    `options`: provider options over the chosen provider's own (onnxruntime checks their names); they are
    meant for the provider asked for, so a fallback drops them (logged). `precision`: the bundle's denoiser's, which
    `auto` weighs (Provider.auto_eligible)."""
    have = available(offered)
    key = name.lower()
    overrides = {str(k): str(v) for k, v in (options or {}).items()}
    if key == "auto":
        chosen = _auto(have, precision)
        log.info("provider auto -> %s (available: %s)", chosen, ", ".join(have))
        clash = ort_builds.clash()
        if clash:
            log.warning("%s (auto chose %s among what is left)", clash, chosen)
        # a graph OpenVINO's runtime cannot compile runs on onnxruntime's CPU provider: auto chose it for speed, and
        # must not fail a bundle the CPU provider runs
        fallback = fallback or REGISTRY[chosen].runtime != "onnxruntime"
        return Resolution(REGISTRY[chosen], name, False, overrides, fallback)
    if key not in REGISTRY:
        raise ProviderError("provider_unknown", name=name, known=", ".join(["auto", *REGISTRY]))
    if key not in have:
        builds = ort_builds.installed()
        if len(builds) > 1 and REGISTRY[key].runtime == "onnxruntime":  # the install is broken (ort_builds.py)
            raise ProviderError(
                "builds_clash",
                name=name,
                count=len(builds),
                builds=ort_builds.describe(builds),
                fix=ort_builds.one_build(builds, REGISTRY[key].extra),
            )
        if not fallback and REGISTRY[key].runtime != "onnxruntime":
            raise ProviderError(
                "runtime_unavailable", name=name, runtime=REGISTRY[key].runtime, install=REGISTRY[key].install
            )
        if not fallback:
            raise ProviderError(
                "provider_unavailable", name=name, available=", ".join(have), install=REGISTRY[key].install
            )
        chosen = _auto(have)
        log.warning(
            "provider %s is not available; falling back to %s%s",
            name,
            chosen,
            f" without its options ({', '.join(overrides)})" if overrides else "",
        )
        return Resolution(REGISTRY[chosen], name, True, fallback=True)
    return Resolution(REGISTRY[key], name, False, overrides, fallback)


def _auto(have: list[str], precision: str | None = None) -> str:
    return next(p for p in AUTO_ORDER if p in have and REGISTRY[p].auto_eligible(precision))


def parse_options(pairs) -> dict[str, str]:
    """KEY=VALUE strings (the CLI's --provider-option) as a dict; a malformed one is a clear error."""
    options = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ProviderError("provider_option", value=pair)
        options[key.strip()] = value.strip()
    return options


def preferred_precision(provider: str) -> str:
    """The bundle precision to export for a provider (the first that suits it)."""
    return REGISTRY[provider].precisions[0]
