"""Blocks kept in fp32, put back into a graph quantised whole: a `--keep auto` export's final graph without a
second quantisation.

The sensitivity pass quantises the whole graph once (blocks.py). Where the check then keeps blocks in fp32, each
of their nodes gets back its fp32 weights, and the Q/DQ pairs that rounded a tensor only for kept nodes go (a graph
output's among them: its producer makes it again), with the int8 weights only they read.
The result is the graph onnxruntime's quantiser makes with those nodes excluded, on the same ranges: a tensor that
a quantised node also reads stays rounded for all its readers, as the quantiser leaves it. Running that quantiser
again took 16-20 s for the full-size SD-Turbo UNet and 12-15 s for its text encoder (int8-dynamic); this takes
2.5 s and 4.5 s, a read and a write of the graph. Hand-written because onnxruntime offers no way to take nodes
of a quantised graph back to fp32.

Nodes the quantiser replaced (int8-dynamic's MatMulInteger, int4's MatMulNBits) are put back as the fp32 graph
has them, where the replacement made their output; what only the replacement read goes with it.
"""

from __future__ import annotations

from pathlib import Path


def restore_fp32(quantised: Path, src: Path, dst: Path, restore: set[str], quantised_nodes: set[str]) -> None:
    """Writes to `dst` the quantised graph `quantised` (of the fp32 graph `src`; `quantised_nodes`: the nodes of
    the quantiser's op types) with the nodes `restore` in fp32 again. Its weights go to `dst`'s name +
    ".data" beside it where the quantiser wrote them beside `quantised` or they pass quantize.LARGE_GRAPH_BYTES,
    else inside it (bundle_quantize.place_quantized puts them where the bundle keeps them)."""
    import onnx
    from onnx import helper
    from onnx.external_data_helper import uses_external_data

    from .blocks import tensors_read
    from .quantize import LARGE_GRAPH_BYTES

    quantised, src, dst = Path(quantised), Path(src), Path(dst)
    model = onnx.load(str(quantised), load_external_data=False)
    fp32 = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    originals = {n.name: n for n in fp32.graph.node if n.name in restore}
    if set(restore) - originals.keys():
        raise ValueError(f"nodes not in {src.name}: {sorted(set(restore) - originals.keys())[:5]}")
    _unround(graph, restore, quantised_nodes)
    weights = {t.name for t in fp32.graph.initializer}
    made: dict[str, object] = {}  # tensor -> the restored node that makes it, or None where it is an fp32 weight
    present = {n.name: n for n in graph.node}
    inserted: dict[int, object] = {}  # id -> a restored node the quantiser had replaced, to place
    for name, original in originals.items():
        node = present.get(name)
        if node is not None and node.op_type == original.op_type:  # QDQ: the node itself
            # its own fp32 weights; the tensors it reads as _unround left them (rounded where quantised nodes read them)
            node.input[:] = [fp32 if fp32 in weights else now for now, fp32 in zip(node.input, original.input)]
        else:  # replaced by the quantiser's own nodes (MatMulInteger, MatMulNBits): the fp32 node again
            node = onnx.NodeProto()
            node.CopyFrom(original)
            inserted[id(node)] = node
        made.update((t, node) for t in node.output if t)
        made.update((t, None) for t in original.input if t in weights)  # a bias's Dequantize bears its name
    candidates = []
    for node in graph.node:
        makers = [made[t] for t in node.output if t in made]
        if makers and makers[0] is not node:  # its tensor is a restored node's now
            maker = makers[0]
            if maker is not None and inserted.pop(id(maker), None) is not None:
                candidates.append(maker)  # where the quantiser made that tensor: after what it reads
            continue
        candidates.append(node)
    if inserted:
        raise ValueError(f"{quantised.name}: no node makes what {len(inserted)} restored nodes make")
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
    # beside it as the quantiser wrote them (a copy a weight at a time), or where they must be
    external = any(uses_external_data(t) for t in graph.initializer)
    external = external or sum(_nbytes(t) for t, _ in initializers) > LARGE_GRAPH_BYTES
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
    returned = {o.name for o in graph.output}
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
            if not dies:
                continue
            if rounded in returned and source is not None:  # a graph output: its producer makes it under its name
                source.output[:] = [rounded if name == tensor else name for name in source.output]
                del dq.output[:]  # made by the producer now; the pair feeds nothing and goes
                continue
            for reader in readers.get(rounded, []):
                reader.input[:] = [tensor if name == rounded else name for name in reader.input]


INLINE_BYTES = 1024  # smaller weights stay in the graph's message beside external data (as bundle_writer saves)


def _nbytes(tensor) -> int:
    """A weight's size: its external data's length, or its bytes in the message."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return (ExternalDataInfo(tensor).length or 0) if uses_external_data(tensor) else tensor.ByteSize()


def _place_weights(graph, initializers, dst: Path, external: bool) -> Path | None:
    """Adds `initializers` ((tensor, the folder its external data lies in)) to `graph`: with `external`, every
    weight kept outside its graph, and every one inside past INLINE_BYTES, is copied one tensor at a time into
    `dst`'s data file; without, those outside are read in. Returns the data file written, if any."""
    from onnx import TensorProto
    from onnx.external_data_helper import uses_external_data

    from .tracing import append_bytes, append_external, external_bytes

    data = dst.with_name(f"{dst.name}.data") if external else None
    sink = open(data, "wb", buffering=0) if data is not None else None
    try:
        for tensor, folder in initializers:
            placed = graph.initializer.add()
            placed.CopyFrom(tensor)
            if uses_external_data(tensor) and sink is not None:  # file to file, not through Python
                append_external(tensor, folder, sink, data.name, placed)
                continue
            if uses_external_data(tensor):
                raw = external_bytes(tensor, folder)
            elif sink is not None and tensor.HasField("raw_data") and len(tensor.raw_data) > INLINE_BYTES:
                raw = tensor.raw_data  # out of the message too: serialising large messages is slow
            else:
                continue
            if sink is not None:
                placed.ClearField("raw_data")
                append_bytes(placed, raw, sink, data.name)
            else:
                del placed.external_data[:]
                placed.data_location = TensorProto.DEFAULT
                placed.raw_data = raw
            del raw
    finally:
        if sink is not None:
            sink.close()
    return data
