"""The denoiser cut into graphs run one after another (`--segments N`), so that low-memory mode holds one
segment's weights at a time instead of the whole denoiser's (runtime/segmented_session.py).

At full size the denoiser's weights set the low-memory peak: they stay resident for the whole call, memory-
mapped or not. Cut into N segments of about equal weight, each opened, run and closed in turn, the peak holds
one N-th of them, plus the tensors that cross the cuts (the UNet's skip connections: a few MB at 512x512).

A cut is placed near each N-th of the weights where the fewest tensors cross it. Constant nodes are copied into
every segment that reads them rather than passed across. Hand-written: onnx.utils.extract_model cuts a model
at given tensor names, but does not choose the cuts, and it types a segment's inputs by onnx's shape inference,
which does not know onnxruntime's contrib operators (4-bit MatMulNBits); the types here come from onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import ExportError

# a cut may move this share of the denoiser's weights from its ideal place to cross fewer tensors
CUT_WINDOW = 0.05
# segmented against whole: the same operators on the same weights; only fusions across a cut can differ
SEGMENT_TOLERANCE = 1e-5


@dataclass(frozen=True)
class Segment:
    nodes: list  # NodeProtos, in graph order (Constant nodes the segment reads included)
    inputs: list[str]  # graph inputs and tensors made by earlier segments
    outputs: list[str]  # tensors later segments read, and graph outputs made here
    initializers: list[str]


def initializer_bytes(tensor) -> int:
    """A weight's size without reading it (a TensorProto from a graph's structure): external data records its
    length."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    import onnx

    count = int(np.prod(tensor.dims)) if tensor.dims else 1
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def plan_segments(graph, count: int) -> list[Segment]:
    """`graph` (a GraphProto, topologically sorted as onnx requires) cut into `count` segments."""
    import onnx

    subgraphs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)  # If / Loop bodies read outer tensors
    if any(a.type in subgraphs for node in graph.node for a in node.attribute):
        raise ExportError("export_segments", detail="the graph has control flow (If / Loop), which is not cut")
    sizes = {t.name: initializer_bytes(t) for t in graph.initializer}
    # Static nodes read only weights and other static nodes' outputs (Constant, Identity of a shared weight, a
    # 4-bit weight's DequantizeLinear): copied into each segment that reads them, never passed across a cut
    static: dict[str, object] = {}
    for node in graph.node:
        if all(not name or name in sizes or name in static for name in node.input):
            static.update({o: node for o in node.output})
    nodes = [n for n in graph.node if not (n.output and n.output[0] in static)]
    if count > len(nodes):
        raise ExportError("export_segments", detail=f"{count} segments for a graph of {len(nodes)} operators")

    def weights_of(names) -> tuple[list, list[str]]:
        """The static nodes and the weights behind these tensors, in first-seen order."""
        own, read, todo = {}, {}, [n for n in names if n]
        while todo:
            name = todo.pop()
            if name in sizes:
                read[name] = True
            elif name in static and id(static[name]) not in own:
                own[id(static[name])] = static[name]
                todo.extend(n for n in static[name].input if n)
        return list(own.values()), list(read)

    # each weight counts once, at its first reader
    weight, seen = np.zeros(len(nodes)), set()
    producer, last_reader = {}, {}
    for i, node in enumerate(nodes):
        for name in weights_of(node.input)[1]:
            if name not in seen:
                seen.add(name)
                weight[i] += sizes[name]
        for name in node.input:
            last_reader[name] = i
        for name in node.output:
            producer[name] = i
    graph_outputs = {o.name for o in graph.output}
    for name in graph_outputs:
        last_reader[name] = len(nodes)  # a graph output crosses every cut after its producer
    # crossing[c]: tensors made before node c and read at or after it (a cut just before node c)
    delta = np.zeros(len(nodes) + 2)
    for name, made in producer.items():
        end = last_reader.get(name, made)
        if end > made:
            delta[made + 1] += 1
            delta[end + 1] -= 1
    crossing = np.cumsum(delta)[: len(nodes) + 1]
    before = np.concatenate([[0.0], np.cumsum(weight)])  # weight of nodes [0, c)
    total = before[-1]
    cuts = [0]
    for k in range(1, count):
        target = total * k / count
        window = [c for c in range(cuts[-1] + 1, len(nodes)) if abs(before[c] - target) <= CUT_WINDOW * total] or [
            int(np.clip(np.searchsorted(before, target), cuts[-1] + 1, len(nodes) - 1))
        ]
        cuts.append(min(window, key=lambda c: (crossing[c], abs(before[c] - target))))
    cuts.append(len(nodes))
    if len(set(cuts)) != len(cuts):
        raise ExportError("export_segments", detail=f"the graph's weights do not split into {count} segments")

    spans = [nodes[a:b] for a, b in zip(cuts, cuts[1:])]
    read_later: list[set[str]] = [set() for _ in spans]  # tensors read by segments after segment k
    for k in range(len(spans) - 2, -1, -1):
        read_later[k] = read_later[k + 1] | {name for n in spans[k + 1] for name in n.input}
    graph_inputs = {i.name for i in graph.input}
    order = {id(n): i for i, n in enumerate(graph.node)}
    segments = []
    for k, span in enumerate(spans):
        made = {name for n in span for name in n.output}
        read = list(dict.fromkeys(name for n in span for name in n.input if name))
        own, initializers = weights_of(read)
        inputs = [name for name in read if name not in made and name not in sizes and name not in static]
        unknown = [name for name in inputs if name not in graph_inputs and name not in producer]
        if unknown:
            raise ExportError("export_segments", detail=f"tensor {unknown[0]} is read but never made")
        outputs = [name for n in span for name in n.output if name in read_later[k] or name in graph_outputs]
        segments.append(
            Segment(
                nodes=sorted(own, key=lambda n: order[id(n)]) + list(span),
                inputs=inputs,
                outputs=list(dict.fromkeys(outputs)),
                initializers=initializers,
            )
        )
    return segments


def crossing_types(path: Path, names: list[str]) -> dict[str, tuple[int, list]]:
    """(onnx element type, dims) of intermediate tensors, as onnxruntime infers them: the graph opened with them
    as extra outputs (untyped outputs are typed on load), not run."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    probe = path.with_name(f".types-{path.name}")
    onnx.save_model(model, str(probe))  # beside the graph: its external data references still resolve
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(probe), opts, providers=["CPUExecutionProvider"])
        found = {o.name: o for o in session.get_outputs()}
    finally:
        probe.unlink()
    elem = {
        "tensor(float)": 1,
        "tensor(uint8)": 2,  # int8-static graphs: a quantised activation between its QuantizeLinear and DequantizeLinear
        "tensor(int8)": 3,
        "tensor(int32)": 6,
        "tensor(int64)": 7,
        "tensor(bool)": 9,
        "tensor(float16)": 10,
    }
    types = {}
    for name in names:
        arg = found[name]
        if arg.type not in elem:
            raise ExportError("export_segments", detail=f"tensor {name} crosses a cut as {arg.type}")
        types[name] = (elem[arg.type], [d if isinstance(d, (int, str)) else None for d in arg.shape])
    return types


def write_segments(path: Path, name: str, count: int, save) -> list[dict]:
    """Writes the graph at `path` as `count` graphs `name.K.onnx` beside it (each with its weights in
    `name.K.onnx.data` when `path`'s are external). `save(model, folder, stem, external)` writes one graph
    and returns its manifest files. Returns each segment's {"files", "inputs", "outputs"}, in run order;
    the caller removes the whole graph."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    external = path.with_name(f"{path.name}.data").exists()
    segments = plan_segments(graph, count)
    given = {v.name: v for v in list(graph.input) + list(graph.output)}
    crossing = sorted({n for s in segments for n in s.inputs + s.outputs if n not in given})
    types = crossing_types(path, crossing)
    initializers = {t.name: t for t in graph.initializer}

    def info(tensor: str):
        if tensor in given:
            return given[tensor]
        elem, dims = types[tensor]
        return onnx.helper.make_tensor_value_info(tensor, elem, dims)

    entries = []
    for k, seg in enumerate(segments):
        part = onnx.helper.make_graph(
            seg.nodes,
            f"{graph.name}_{k}",
            [info(t) for t in seg.inputs],
            [info(t) for t in seg.outputs],
            [initializers[t] for t in seg.initializers],
        )
        piece = onnx.helper.make_model(part, opset_imports=model.opset_import, ir_version=model.ir_version)
        piece.functions.extend(model.functions)
        files = save(piece, path.parent, f"{name}.{k}", external)
        entries.append(
            {
                "files": files,
                "inputs": [_spec(info(t)) for t in seg.inputs],
                "outputs": [_spec(info(t)) for t in seg.outputs],
            }
        )
        del piece, part
    return entries


def _spec(value) -> dict:
    """A tensor's manifest entry (runtime/manifest.py TensorSpec): dims as ints, names, or None where unknown."""
    _numpy = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16"}
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]
    return {"name": value.name, "dtype": _numpy.get(value.type.tensor_type.elem_type, "unknown"), "shape": dims}


def _feeds(session, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs a session declares, int32 where it wants int32 (as the export check feeds them)."""
    declared = {i.name: i.type for i in session.get_inputs()}
    return {
        k: (v.astype(np.int32) if declared[k] == "tensor(int32)" else v) for k, v in inputs.items() if k in declared
    }


def run_whole(path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, _feeds(session, inputs))))


def run_segments(folder: Path, entries: list[dict], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The segments in turn, one session open at a time; every tensor they make, by name."""
    import onnxruntime as ort

    tensors = dict(inputs)
    for entry in entries:
        session = ort.InferenceSession(str(folder / next(iter(entry["files"]))), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        tensors.update(zip(names, session.run(None, _feeds(session, tensors))))
        del session
    return tensors


def segment_graph(folder: Path, name: str, graph_file: str, count: int, inputs: dict, save) -> tuple[dict, dict]:
    """Replaces `folder/graph_file` (and its external data) by `count` segments, checked against it on `inputs`:
    an export error past SEGMENT_TOLERANCE (relative to each output's largest value). Returns the
    component's new manifest `files` and its `segments` attribute, with the check's difference."""
    path = folder / graph_file
    whole = run_whole(path, inputs)
    entries = write_segments(path, name, count, save)
    for old in (path, path.with_name(f"{path.name}.data")):
        old.unlink(missing_ok=True)
    got = run_segments(folder, entries, inputs)
    diffs = {}
    for out, ref in whole.items():
        scale = max(1.0, float(np.abs(ref).max()))
        diffs[out] = float(np.abs(got[out].astype(np.float32) - ref).max() / scale)
    if any(d > SEGMENT_TOLERANCE or not np.isfinite(d) for d in diffs.values()):
        worst = max(diffs, key=lambda k: diffs[k] if np.isfinite(diffs[k]) else np.inf)
        raise ExportError(
            "export_segments",
            detail=f"they differ from the whole graph on {worst} by {diffs[worst]:.3g} (> {SEGMENT_TOLERANCE:g})",
        )
    files = {n: meta for e in entries for n, meta in e["files"].items()}
    attribute = {
        "segments": [{"files": list(e["files"]), "inputs": e["inputs"], "outputs": e["outputs"]} for e in entries],
        "segments_check": {"max_rel_diff": diffs, "tolerance": SEGMENT_TOLERANCE},
    }
    return files, attribute
