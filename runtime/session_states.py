"""The states a graph's session reports (Pipeline.provider_report): each an enum whose values are the report's words.

They are str enums so that a state compares, prints and serializes as its word ("on", "hit", ...): the report's
JSON, the CLI's table and the benchmarks' files read those words. A state that carries a detail (the fixed
dimensions, why something was refused) is reported with it: "fixed <dims>", "refused: <why>" (`with_detail`).
"""

from __future__ import annotations

import enum

_REFUSED = "refused"  # the one word whose detail (why) follows a colon


class ReportedState(str, enum.Enum):
    # str() and format() give the word itself, not "ClassName.MEMBER", on every Python we support
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def with_detail(self, detail: str) -> str:
        """The report's text: the word, then its detail where it has one ("fixed sample 1x4x8x8", "refused: <why>")."""
        if not detail:
            return self.value
        return f"{self.value}: {detail}" if self.value == _REFUSED else f"{self.value} {detail}"


class BindingState(ReportedState):
    """Whether a graph's runs go through I/O binding (binding.py)."""

    OFF = "off"  # host memory, or the caller turned it off
    ON = "on"
    REFUSED = _REFUSED  # this onnxruntime build could not place buffers on the device: runs go unbound


class ShapeState(ReportedState):
    """Which session a graph runs on where each input shape gets its own (shape_sessions.py)."""

    PENDING = "not compiled yet"  # OpenVINO's runtime compiles a graph for the shapes of its first call
    DYNAMIC = "dynamic"  # the graph as exported, symbolic dimensions and all
    FIXED = "fixed"  # a session opened for the last input shape, its dimensions fixed
    REFUSED = _REFUSED  # onnxruntime would not open one for that shape: it runs on the dynamic session


class CaptureState(ReportedState):
    """Whether a graph replays a captured graph (CUDA graphs); follows ShapeState when capturing."""

    OFF = "off"
    CAPTURED = "captured"
    REFUSED = _REFUSED


class CacheStatus(ReportedState):
    """Where a graph's session came from (graph_cache.py)."""

    OFF = "off"  # no cache asked for
    PROVIDER = "provider"  # a compiling provider keeps its own (providers.py `cache_option`)
    HIT = "hit"  # the optimized graph was loaded from our cache
    MISS = "miss"  # optimized now and saved for the next start
    SKIPPED = "skipped"  # optimized now, not saved (short of disk, or the save failed)
