"""Opening one graph's onnxruntime sessions: through our graph cache, or a compiling provider's own, and saying
when the chosen provider did not take the graph (it then runs on the CPU): onnxruntime left it to its CPU
provider, or the provider failed to compile it and the caller allowed a fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import onnxruntime as ort

from . import graph_cache, session_config
from .errors import BundleError, EdgediffError
from .manifest import ComponentSpec
from .provider_loading import new_session
from .providers import Resolution, resolve
from .session_states import CacheStatus

log = logging.getLogger("edgediff.session")

# graphs whose kernels need onnxruntime's layout rewrites even in low-memory mode: static int8's QLinearConv runs
# on the NHWC form they make
LAYOUT_PRECISIONS = frozenset({"int8-static"})


def summarize(exc: Exception) -> str:
    """onnxruntime's message in one line: its first line, and its last when the cause is there (OpenVINO's
    compile errors put the reason at the end of a long trace)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip(" ;")]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


class GraphLoader:
    """Opens sessions of one graph of a bundle. `cache_folder`: keep optimized forms there (graph_cache.py);
    None: no cache."""

    def __init__(
        self,
        name: str,
        path: Path,
        spec: ComponentSpec,
        resolution: Resolution,
        bundle_path,
        threads: int | None = None,
        low_memory: bool = False,
        cache_folder: Path | None = None,
        cpu_layout: bool = True,
        refused: str = "",
    ):
        self.name, self.path, self.spec, self.resolution = name, path, spec, resolution
        self.bundle_path = bundle_path
        self.threads, self.low_memory, self.cache_folder = threads, low_memory, cache_folder
        self.cpu_layout = cpu_layout
        # why the chosen provider could not take this graph, once it runs on the CPU instead; given where an earlier
        # session of it was refused (low memory reopens graphs): opened on the CPU, the provider not tried again
        self.refused = refused
        if refused:
            self.resolution = resolve("cpu")

    def open_dynamic(self) -> tuple[ort.InferenceSession, CacheStatus]:
        """The graph as exported; one that onnxruntime cannot load is the bundle's error, unless the caller allows a
        fallback and another provider than the CPU's failed: the graph then runs on the CPU provider. A provider
        may fail on one graph of a bundle only (onnxruntime-openvino 1.24 compiles every SD-Turbo graph but the
        dynamic int8 text encoder in bf16), and the others keep it."""
        try:
            return self.open()
        except EdgediffError:
            raise  # ours already says what is wrong (a bad EDGEDIFF_CACHE_MAX_GB)
        except Exception as exc:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            provider = self.resolution.provider
            if self.resolution.fallback and provider.name != "cpu":
                self.refused = summarize(exc)
                log.warning(
                    "%s: %s cannot take this graph (%s); it runs on the CPU", self.name, provider.name, self.refused
                )
                self.resolution = resolve("cpu")
                return self.open_dynamic()
            hint = provider.load_hint(self.spec.precision)
            if provider.name != "cpu":
                hint += "; --fallback runs a graph the provider cannot take on the CPU"
            raise BundleError(
                "graph_unloadable", path=self.bundle_path, file=self.path.name, detail=summarize(exc) + hint
            ) from exc

    def open(
        self, dims: dict[str, int] | None = None, capture: bool = False
    ) -> tuple[ort.InferenceSession, CacheStatus]:
        """A session of this graph and where it came from. `dims`: fixed dimensions (a shape-fixed session);
        `capture`: with the provider's graph capture option on. Both key the cache: a shape-fixed graph's
        optimized form differs from the dynamic one's, and a cached one spares each new image size its optimizer
        run. onnxruntime's own errors are raised as they are."""
        resolution, provider = self.resolution, self.resolution.provider
        extra = {provider.graph_capture_option: "1"} if capture else {}

        def options() -> ort.SessionOptions:
            opts = session_config.session_options(self.threads, resolution, self.low_memory, dims)
            return session_config.skip_layout_changes(opts) if self.keeps_layout else opts

        if self.cache_folder is None or (provider.compiles and not provider.saves_context):
            # a compiling provider keeps its own cache, where it has one (onnxruntime cannot save its compiled graph)
            own_cache = provider.cache_options(self.cache_folder) if self.cache_folder is not None else {}
            status = CacheStatus.PROVIDER if own_cache else CacheStatus.OFF
            own_cache = {k: v for k, v in own_cache.items() if k not in resolution.overrides}  # the caller's win
            session = new_session(self.path, options(), resolution.ort_providers_with(**own_cache, **extra))
        else:
            tag = (
                resolution.cache_tag_fixed({"dims": dims or {}, "options": extra})
                if dims or extra
                else resolution.cache_tag
            )
            if self.keeps_layout:  # optimised differently: an entry of its own
                tag += "-keeplayout"
            key = graph_cache.cache_key(self.name, self.spec.files[self.spec.graph_file]["sha256"], tag, self.path)
            session, status = graph_cache.open_cached(
                self.path,
                key,
                self.spec.size,
                options,
                resolution.ort_providers_with(**extra),
                self.cache_folder,
                save="context" if provider.compiles else "graph",
            )
        if not self.refused and self.falls_back(session):  # a refusal was logged with its reason
            log.warning("%s: %s did not take this graph; it runs on the CPU", self.name, provider.name)
        return session, status

    @property
    def keeps_layout(self) -> bool:
        """Whether this graph opens without onnxruntime's layout rewrites (session_config.skip_layout_changes): in
        low-memory mode, or with RuntimeOptions.cpu_layout off."""
        return (
            (self.low_memory or not self.cpu_layout)
            and self.spec.precision not in LAYOUT_PRECISIONS
            and self.resolution.provider.name == "cpu"
        )

    def falls_back(self, session: ort.InferenceSession) -> bool:
        """Whether the chosen provider left this session to the CPU provider alone."""
        provider = self.resolution.provider
        return bool(self.refused) or (provider.name != "cpu" and session.get_providers()[0] != provider.ort_name)
