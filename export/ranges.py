"""Activation ranges for static int8: the graph run with a ReduceMin and a ReduceMax after each tensor the scheme
quantises, the per-run values merged into MinMax ranges as onnxruntime's MinMaxCalibrater merges them.

Hand-written for speed: that calibrator loads the graph with its weights, inserts each of its ~1,300 reductions
after a scan of the node list, and saves the augmented graph with a copy of every weight, 33 s of its 40 s on the
full-size UNet at 512 with one feed. Here the reductions are added to the graph's structure in one pass, each right
after the node making its tensor, and the augmented graph is saved beside the source, its weights read where they
are. The same augmented graph can stand in for the graph's own session while the exporter records calibration
inputs (calibration.record_feeds): one run of each feed gives its output and its ranges.
"""

from __future__ import annotations

import contextvars
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .quantize import Scheme

_RANGE = "edgediff_range/"
# Where runs overlap (calibration.record_feeds generates prompts side by side), the place of a run in the recording:
# the prompt its thread generates. Runs are kept by it (those of one prompt in the order they ran), so that a run's
# ranges stay paired with the feed recorded beside them whichever thread ran first.
RUN_ORDER: contextvars.ContextVar[int] = contextvars.ContextVar("edgediff_run_order", default=0)


def calibrated_tensors(model, scheme: Scheme) -> list[str]:
    """The tensors onnxruntime's calibrators take for these op types: the float (fp32, fp16) inputs and outputs
    of the scheme's nodes that are not weights, typed by onnx's shape inference; in graph order."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(model)  # the structure only: weights are not read
    graph = typed.graph
    infos = {v.name: v for v in (*graph.value_info, *graph.output, *graph.input)}
    weights = {t.name for t in graph.initializer}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    chosen = {}
    for node in graph.node:
        if node.op_type in scheme.op_types:
            for t in (*node.input, *node.output):
                info = infos.get(t)
                if (
                    info is not None
                    and info.type.HasField("tensor_type")
                    and info.type.tensor_type.elem_type in floats
                    and t not in weights
                ):
                    chosen[t] = None
    return list(chosen)


class RangeGraph:
    """`src` with a ReduceMin and a ReduceMax after every tensor whose range `scheme` takes, saved beside it (its
    external-data paths hold there) until remove(). Each session opened on it keeps the ranges of every run in
    this object, in run order (RUN_ORDER), so that the ranges of the runs wanted can be merged afterwards (ranges())."""

    def __init__(self, src: Path, scheme: Scheme):
        import onnx
        from onnx import helper

        src = Path(src)
        model = onnx.load(str(src), load_external_data=False)
        self.tensors = calibrated_tensors(model, scheme)
        graph = model.graph
        self.output_names = [o.name for o in graph.output]
        reductions = {t: (f"{_RANGE}min/{t}", f"{_RANGE}max/{t}") for t in self.tensors}

        def reduce(tensor: str) -> list:
            low, high = reductions[tensor]
            # keepdims: a reduction of a tensor with an empty axis fails without it
            return [
                helper.make_node(op, [tensor], [out], name=out, keepdims=1)
                for op, out in (("ReduceMin", low), ("ReduceMax", high))
            ]

        first = [n for v in graph.input if v.name in reductions for n in reduce(v.name)]
        nodes = first + [
            n for node in graph.node for n in (node, *(r for t in node.output if t in reductions for r in reduce(t)))
        ]
        del graph.node[:]
        graph.node.extend(nodes)
        self.reduction_names = [out for pair in reductions.values() for out in pair]
        graph.output.extend(helper.make_empty_tensor_value_info(out) for out in self.reduction_names)  # typed by ORT
        self.path = src.with_name(f".{src.stem}.calibration.onnx")
        try:
            onnx.save_model(model, str(self.path))
        except BaseException:  # a half-written graph (a full disk) is not left beside the source
            self.remove()
            raise
        self._runs: list[tuple[int, list[np.ndarray]]] = []  # (RUN_ORDER, each reduction's value) per run

    @property
    def runs(self) -> list[list[np.ndarray]]:
        """Per run, in RUN_ORDER (runs of one order as they ran): each reduction's value, in reduction_names' order."""
        return [values for _, values in sorted(self._runs, key=lambda run: run[0])]

    def add_run(self, values: list[np.ndarray]) -> None:
        self._runs.append((RUN_ORDER.get(), values))  # one append: atomic where runs overlap

    def open(self, name: str = "", low_memory: bool = False, threads: int | None = None) -> RangeSession:
        """A session of the augmented graph; `name`: the component it stands for (in input errors); `low_memory`
        and `threads` as the runtime's session options (runtime/session_config.py)."""
        return RangeSession(self, name or self.path.stem, low_memory, threads)

    def ranges(self, runs: list[int] | None = None):
        """onnxruntime.quantization.TensorsData: each tensor's MinMax range over `runs` (indices in run order; None:
        every run), NaN ignored as onnxruntime's calibrator ignores it."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData

        ordered = self.runs
        chosen = [ordered[i] for i in (range(len(ordered)) if runs is None else runs)]
        if not chosen:
            raise ValueError("static int8 needs calibration inputs")
        table = {}
        for k, t in enumerate(self.tensors):
            low = high = None
            for values in chosen:  # merged run by run, as onnxruntime's calibrator merges its batches
                lo, hi = values[2 * k].reshape(-1), values[2 * k + 1].reshape(-1)
                low = lo if low is None else np.fmin(low, lo)
                high = hi if high is None else np.fmax(high, hi)
            table[t] = (low, high)
        return TensorsData(CalibrationMethod.MinMax, table)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class RangeSession:
    """A session of a RangeGraph with GraphSession's calling convention (`run`, `inputs`, `output_names`,
    `check_inputs`), so that a pipeline can run it in the graph's place: each run returns the graph's own outputs
    and adds that run's ranges to the RangeGraph.

    No graph optimisation and no memory pattern (that plans one buffer for every activation of the unoptimised
    graph). Nodes run in priority order: onnxruntime's default order (a depth-first walk back from the outputs) runs
    the added reductions late, so every tensor they read stays alive: 8.2 GiB against 3.7 GiB on the full-size UNet
    at 512, and slower. Weights are not prepacked: for the few feeds it runs, packing costs more than it saves (the
    full-size UNet's session opened and ran 8 feeds at 256x256 in 8.8 s, 9.3-9.7 s with packing, at the same 3.5 GiB
    peak: its weights are memory-mapped, and packed copies take the place of the pages they were packed from)."""

    def __init__(self, graph: RangeGraph, name: str, low_memory: bool = False, threads: int | None = None):
        import onnxruntime as ort

        from edgediff.runtime.input_check import InputCheck
        from edgediff.runtime.session_config import session_options

        options = session_options(threads, low_memory=low_memory)  # threads, no spinning; low memory: no arena
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_mem_pattern = False
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.add_session_config_entry("session.disable_prepacking", "1")
        self.graph = graph
        self.session = ort.InferenceSession(str(graph.path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = list(graph.output_names)
        self.check_inputs = InputCheck(name, self.inputs)

    def run(self, run_options=None, **feeds) -> list[np.ndarray]:
        graph = self.graph
        values = self.session.run(self.output_names + graph.reduction_names, self.check_inputs(feeds), run_options)
        graph.add_run(values[len(self.output_names) :])
        return values[: len(self.output_names)]

    def ranges_only(self, feed: dict) -> None:
        """One run for its ranges alone (the graph's outputs are not fetched)."""
        self.graph.add_run(self.session.run(self.graph.reduction_names, feed))


def calibrate(src: Path, scheme: Scheme, feeds: list[dict]):
    """Activation ranges (MinMax) of the float tensors entering and leaving the scheme's op types, from one run of
    the graph over `feeds`, as onnxruntime.quantization.TensorsData: the tensors and ranges onnxruntime's
    MinMaxCalibrater finds (tests/export/test_weight_quant.py)."""
    from .quantize import release_memory

    if not feeds:
        raise ValueError("static int8 needs calibration inputs")
    graph = RangeGraph(src, scheme)
    try:
        session = graph.open()
    finally:
        graph.remove()  # an open session no longer reads the file
    for feed in feeds:  # one input at a time, merged into the running ranges
        session.ranges_only(feed)
    del session
    release_memory()
    return graph.ranges()
