"""Blocks kept in fp32, put back into a graph quantised whole: a `--keep auto` export's final graph without a
second quantisation.

The sensitivity pass quantises the whole graph once (blocks.py). Where the check then keeps blocks in fp32, each
of their nodes gets back its fp32 weights and its outputs (a graph output the quantiser had routed through a Q/DQ
pair), and the Q/DQ pairs that rounded a tensor only for kept nodes go, with the int8 weights only they read.
The result is the graph onnxruntime's quantiser makes with those nodes excluded, on the same ranges: a tensor that
a quantised node also reads stays rounded for all its readers, as the quantiser leaves it. Running that quantiser
again took 16-19 s for the full-size SD-Turbo UNet and 18 s for its text encoder; this reads and writes the graph
once. Hand-written because onnxruntime offers no way to take nodes of a QDQ graph back to fp32.

QDQ graphs only (int8-static): the dynamic and 4-bit quantisers replace the nodes they quantise.
"""

from __future__ import annotations

from pathlib import Path


def restore_fp32(
    quantised: Path, src: Path, dst: Path, restore: set[str], quantised_nodes: set[str], external: bool
) -> None:
    """Writes to `dst` the QDQ graph `quantised` (of the fp32 graph `src`; `quantised_nodes`: the nodes its
    quantiser changed) with the nodes `restore` in fp32 again. `external`: its weights go to `dst`'s name + ".data"
    beside it (as quantize.quantize writes graphs past protobuf's 2 GB), else inside the graph."""
    import onnx
    from onnx import helper

    from .blocks import tensors_read

    quantised, src, dst = Path(quantised), Path(src), Path(dst)
    model = onnx.load(str(quantised), load_external_data=False)
    fp32 = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    originals = {n.name: n for n in fp32.graph.node if n.name in restore}
    if set(restore) - originals.keys():
        raise ValueError(f"nodes not in {src.name}: {sorted(set(restore) - originals.keys())[:5]}")
    _unround(graph, restore, quantised_nodes)
    weights = {t.name for t in fp32.graph.initializer}
    renamed: dict[str, str] = {}  # a graph output the quantiser routed through a Q/DQ pair: the producer's name
    made = set()  # tensors the restored nodes make again, or read as fp32 weights (a bias's Dequantize bears its name)
    for node in graph.node:
        original = originals.get(node.name)
        if original is None:
            continue
        if node.op_type != original.op_type:
            raise ValueError(f"{node.name} is {node.op_type} in {quantised.name}, {original.op_type} in fp32: not QDQ")
        renamed.update((a, b) for a, b in zip(node.output, original.output) if a != b)
        # its own fp32 weights; the tensors it reads as left by _unround (rounded where a quantised node reads them)
        node.input[:] = [fp32 if fp32 in weights else now for now, fp32 in zip(node.input, original.input)]
        node.output[:] = original.output
        made.update(t for t in original.output if t)
        made.update(t for t in original.input if t in weights)
    candidates = []
    for node in graph.node:
        if node.name not in originals and made.intersection(node.output):
            continue  # its tensor is the restored node's now
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
        candidates.append(node)
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(candidates):  # graph order is topological: a walk back finds every node needed
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(tensors_read(node))
    live.reverse()
    own = {t.name for t in graph.initializer} | {o for n in live for o in n.output}  # a bias's Dequantize's too
    initializers = [(t, quantised.parent) for t in graph.initializer if t.name in needed]
    initializers += [(t, src.parent) for t in fp32.graph.initializer if t.name in needed and t.name not in own]
    kept_types = [v for v in graph.value_info if v.name in needed]
    out = helper.make_graph(live, graph.name, list(graph.input), list(graph.output), [], value_info=kept_types)
    data = _place_weights(out, initializers, dst, external)
    result = helper.make_model(out, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    result.ir_version = model.ir_version
    result.functions.extend(model.functions)
    del model, fp32, graph
    try:
        onnx.save_model(result, str(dst))
    except BaseException:
        if data is not None:
            data.unlink(missing_ok=True)
        raise


def _unround(graph, restore: set[str], quantised_nodes: set[str]) -> None:
    """Drops the Q/DQ pairs that round a tensor only for restored nodes (its producer and its readers of the
    quantised op types all restored, at least one of them there): every reader reads the tensor itself. Where a
    quantised node still reads it, every reader reads it rounded, restored ones too, as onnxruntime's quantiser
    leaves a tensor's other readers."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for q in (n for n in graph.node if n.op_type == "QuantizeLinear"):
        tensor = q.input[0]
        source = producer.get(tensor)
        for dq in (n for n in readers.get(q.output[0], []) if n.op_type == "DequantizeLinear"):
            rounded = dq.output[0]
            neighbours = {n.name for n in readers.get(rounded, [])} | ({source.name} if source is not None else set())
            neighbours &= quantised_nodes
            dies = bool(neighbours) and neighbours <= restore
            for reader in readers.get(rounded, []) if dies else ():
                reader.input[:] = [tensor if name == rounded else name for name in reader.input]


def _place_weights(graph, initializers, dst: Path, external: bool) -> Path | None:
    """Adds `initializers` ((tensor, the folder its external data lies in)) to `graph`: with `external`, every
    weight kept outside its graph is copied, one tensor at a time, into `dst`'s data file; without, read in.
    Returns the data file written, if any."""
    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data

    from .tracing import external_bytes, place_external

    data = dst.with_name(f"{dst.name}.data") if external else None
    sink = open(data, "wb") if data is not None else None
    try:
        for tensor, folder in initializers:
            placed = graph.initializer.add()
            placed.CopyFrom(tensor)
            if not uses_external_data(tensor):
                continue
            raw = external_bytes(tensor, folder)
            if sink is not None:
                place_external(placed, data.name, sink.tell(), len(raw))
                sink.write(raw)
            else:
                del placed.external_data[:]
                placed.data_location = TensorProto.DEFAULT
                placed.raw_data = raw
            del raw
    finally:
        if sink is not None:
            sink.close()
    return data
