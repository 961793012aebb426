"""A denoiser exported in segments (export --segments N), run as one graph: each segment's session in turn, the
tensors that cross the cuts passed from one to the next.

With every graph open (the default) all segments stay open and a call costs what the whole graph costs, bar
the fusions a cut prevents. In low-memory mode each segment is opened just before it runs and closed just after,
so only one segment's weights are resident at a time: the peak falls towards 1/N of the denoiser's weights, and
every call pays N openings (the graph cache takes the optimiser out of each; docs/benchmarks.md, "Low memory").
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnxruntime as ort

from .errors import BundleError
from .input_check import InputCheck
from .manifest import ComponentSpec
from .session import GraphSession

_ORT_TYPES = {
    "float32": "tensor(float)",
    "float16": "tensor(float16)",
    "int64": "tensor(int64)",
    "int32": "tensor(int32)",
}


@dataclass(frozen=True)
class _Declared:
    """A declared input as InputCheck reads onnxruntime's NodeArg: its shape and type."""

    shape: list
    type: str


class SegmentedSession:
    """The segments of one component behind GraphSession's run(): `openers[k]()` opens segment k's GraphSession."""

    def __init__(
        self,
        name: str,
        spec: ComponentSpec,
        openers: list[Callable[[], GraphSession]],
        bundle_path,
        low_memory: bool = False,
    ):
        self.name = name
        self.spec = spec
        self._openers = openers
        self.low_memory = low_memory
        self._open: dict[int, GraphSession] = {}
        segments = spec.segments
        # each crossing tensor is dropped after its last reader: the UNet's skip connections do not pile up
        last_reader = {t.name: k for k, seg in enumerate(segments) for t in seg.inputs}
        outputs = {t.name for t in spec.outputs}
        self._dropped_after = [
            [n for n, last in last_reader.items() if last == k and n not in outputs] for k in range(len(segments))
        ]
        made = {t.name for seg in segments for t in seg.outputs}
        missing = [t.name for t in spec.outputs if t.name not in made]
        if missing:
            raise BundleError(
                "graph_mismatch", path=bundle_path, component=name, detail=f"no segment makes output {missing[0]}"
            )
        self.output_names = [t.name for t in spec.outputs]
        # the whole graph's inputs as its manifest declares them: checked here (names, ranks, dtypes) so that an
        # error names the component, not a segment; nothing is opened before the first call
        self.inputs = {t.name: _Declared(t.shape, _ORT_TYPES.get(t.dtype, t.dtype)) for t in spec.inputs}
        self.check_inputs = InputCheck(name, self.inputs)
        if not low_memory:
            for k in range(len(openers)):
                self._segment(k)

    def _segment(self, k: int) -> GraphSession:
        session = self._open.get(k)
        if session is None:
            if self.low_memory:
                self._close()  # the previous segment goes before the next one opens
            session = self._open[k] = self._openers[k]()
        return session

    def _close(self) -> None:
        self._open.clear()
        gc.collect()

    def run(self, run_options: ort.RunOptions | None = None, **feeds) -> list[np.ndarray]:
        tensors = dict(self.check_inputs(feeds))
        for k in range(len(self._openers)):
            session = self._segment(k)
            outputs = session.run(run_options, **{n: tensors[n] for n in session.inputs})
            tensors.update(zip(session.output_names, outputs))
            for n in self._dropped_after[k]:
                tensors.pop(n, None)
        if self.low_memory:
            self._close()
        return [tensors[n] for n in self.output_names]

    @property
    def segments_open(self) -> int:
        return len(self._open)

    # what the pipeline reports per graph (provider_report): the first open segment's, as every segment shares
    # provider, options and cache folder
    def _any(self) -> GraphSession:
        return next(iter(self._open.values()), None) or self._segment(0)

    @property
    def providers(self) -> list[str]:
        return self._any().providers

    @property
    def fell_back_to_cpu(self) -> bool:
        return self._any().fell_back_to_cpu

    @property
    def cache(self):
        return self._any().cache

    @property
    def binding_state(self) -> str:
        return self._any().binding_state

    @property
    def capture_state(self) -> str:
        return self._any().capture_state

    @property
    def shapes(self) -> str:
        return self._any().shapes
