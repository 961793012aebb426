"""Weight quantisation one weight in memory at a time: 4-bit (MatMulNBits) past 2 GB, dynamic and static int8 at any
size.

onnxruntime's quantisers load the whole graph and keep every fp32 weight until they save: about 2.3x the graph's
weights at their peak, more than a 24 GiB machine has for SANA's Gemma-2 (10.5 GB). Here the graph's structure is
loaded without its weights; each weight is read from the external data only when its node is quantised, by
onnxruntime's own code (4-bit: DefaultWeightOnlyQuantizer's node quantiser; int8: quantize_dynamic's
ONNXQuantizer, quantize_static's QDQQuantizer), and its fp32 bytes dropped after: the same nodes and weights, byte
for byte. The result is written a tensor at a time: the quantised weights (an eighth or a quarter of their fp32 size)
from memory, the weights left fp32 (embeddings, norms, excluded nodes) copied from the source's data. Hand-written
because onnxruntime's quantisers have no streaming mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("edgediff.export")


def quantize_int4_streaming(src: Path, dst: Path, exclude: list[str], block_size: int, convs: bool = True) -> int:
    """Writes the 4-bit graph of `src` (weights in external data) to `dst` with its weights in `dst`.data; nodes
    named in `exclude` stay fp32. `convs`: convolutions' weights too, in 4-bit blocks (int4_conv.py; SANA's
    transformer has its Mix-FFN's). Returns the number of nodes quantised."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    from .int4_conv import raise_opset, reader_counts, takes
    from .optimize import declare_microsoft_domain

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    graph = model.graph
    quantizer = DefaultWeightOnlyQuantizer(
        DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, op_types_to_quantize=("MatMul",))
    )
    initializers = {t.name: t for t in graph.initializer}
    readers = reader_counts(graph)
    skip = set(exclude)
    # one pass, the graph's lists rebuilt once at the end: rebuilding them per node copied every weight quantised
    # so far into the graph's protobuf arena each time, which keeps what it is given (full-size SD-Turbo's UNet,
    # a rebuild per convolution: killed at 24 GB)
    nodes, added, done, blocked = [], [], 0, 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type in ("MatMul", "Conv") and len(node.input) > 1 else None
        if weight is None or node.name in skip:
            nodes.append(node)
        elif node.op_type == "MatMul":
            replaced = _quantize_alone(quantizer, node, weight, src.parent, added)
            nodes.extend(replaced)
            done += replaced != [node]  # the fp32 entry, a reference still, is dropped below: now unused
        elif convs and readers[weight.name] == 1 and takes(weight, block_size):
            new, dequantize = _conv_alone(node, weight, src.parent, block_size)
            added.extend(new)
            nodes += [dequantize, node]
            blocked += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    if done:  # MatMulNBits' domain, as onnxruntime's own 4-bit quantiser declares it
        declare_microsoft_domain(model)
    if blocked:
        raise_opset(model)
    done += blocked
    _drop_unused_initializers(graph)
    _write_a_tensor_at_a_time(model, src.parent, dst)
    log.info("%s: %d MatMuls and convolutions in 4 bits, a weight at a time", src.stem, done)
    return done


def quantize_int8_dynamic_streaming(src: Path, dst: Path, op_types: list[str], exclude: list[str]) -> int:
    """Writes what onnxruntime's quantize_dynamic (per-channel int8 weights, `op_types`, `exclude` left fp32) makes
    of `src` (weights in external data) to `dst`, with its weights in `dst`.data, holding one fp32 weight at a time.
    Returns the number of weights quantised."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import onnx_quantizer as ort_onnx_quantizer
    from onnxruntime.quantization.quant_utils import QuantizationMode, add_infer_metadata, update_opset_version

    from .module_patches import patched
    from .quantize import WEIGHT_REDUCE_RANGE, _default_type
    from .weight_quant import StreamingONNXQuantizer

    src, dst = Path(src), Path(dst)
    # the quantiser turns each Gemm into a MatMul named after it (and an Add) before it reads the exclusions
    exclude = [*exclude, *(f"{name}_MatMul" for name in exclude)]
    model = onnx.load(str(src), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # Gemm's weights are transposed into MatMul's as the quantiser starts: read now
        if node.op_type == "Gemm" and len(node.input) > 1 and node.input[1] in initializers:
            _read_in(initializers[node.input[1]], src.parent)
    model = _shapes_inferred(model)
    model = update_opset_version(model, QuantType.QInt8)

    # the quantiser's own save-and-reload would read every weight back in
    reload = [(ort_onnx_quantizer, "save_and_reload_model_with_shape_infer")]
    with patched("shapes_inferred_in_memory", reload, lambda originals: [_shapes_inferred]):
        quantizer = StreamingONNXQuantizer(
            src.parent,
            model,
            True,  # per_channel
            WEIGHT_REDUCE_RANGE,
            QuantizationMode.IntegerOps,
            False,  # static
            QuantType.QInt8,
            QuantType.QUInt8,  # dynamic activations are uint8
            None,
            None,
            exclude,
            list(op_types),
            {"MatMulConstBOnly": True, **_default_type()},
        )
        quantizer.quantize_model()
    quantizer.model.topological_sort()  # as its save_model_to_file does
    model = quantizer.model.model
    add_infer_metadata(model)
    _write_a_tensor_at_a_time(model, src.parent, dst)
    log.info("%s: %d weights in int8, a weight at a time", src.stem, quantizer.streamed)
    return quantizer.streamed


def quantize_static_streaming(src: Path, dst: Path, make_quantizer) -> None:
    """Writes what onnxruntime's QDQ quantiser, `make_quantizer(model)` (quantize._qdq_quantizer), makes of `src` to
    `dst`, with its weights in `dst`.data, reading each fp32 weight from `src`'s external data as the quantiser asks
    for it (weight_quant.weights_read_from). Loading the full-size SD-Turbo UNet's 3.4 GB into the graph to quantise
    it, as load_model_with_shape_infer does, and writing it out again took 5-6 s of its 11 s quantisation."""
    import onnx

    from .weight_quant import vectorised, weights_read_from

    src, dst = Path(src), Path(dst)
    quantizer = make_quantizer(_shapes_inferred(onnx.load(str(src), load_external_data=False)))
    prepared = getattr(quantizer, "prepared", None)  # FastQDQQuantizer's weights, quantised as it finds the scales
    with weights_read_from(src.parent), vectorised(prepared, quantizer.model):
        quantizer.quantize_model()
    if prepared:  # any the quantizer did not ask for are not held while the graph is written
        prepared.clear()
    quantizer.model.topological_sort()  # as its save_model_to_file does
    _write_a_tensor_at_a_time(quantizer.model.model, src.parent, dst)


def _shapes_inferred(model):
    """onnx's shape inference on the structure alone, as load_model_with_shape_infer infers it from the saved file:
    the weights held in memory (Gemm's, transposed by the quantiser) are set aside while it serialises the model,
    which past protobuf's 2 GB it could not (SD3's adaptive norms are Gemms: 2.7 GB), and put back after. `model`
    is left without them: the callers keep the inferred model."""
    import onnx
    from onnxruntime.quantization.quant_utils import add_infer_metadata

    # moved, not copied (each read of a bytes field copies it): `model` gives its bytes up, and each goes into the
    # inferred copy, the model the callers keep, before the next
    held = {}
    for tensor in model.graph.initializer:
        if tensor.HasField("raw_data"):
            held[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
    inferred = onnx.shape_inference.infer_shapes(model)
    for tensor in inferred.graph.initializer:
        data = held.pop(tensor.name, None)
        if data is not None:
            tensor.raw_data = data
    add_infer_metadata(inferred)
    return inferred


def _quantize_alone(quantizer, node, weight, folder: Path, added: list) -> list:
    """onnxruntime's node quantiser on a one-weight graph of its own: the weight's fp32 bytes live in that small
    message and go with it. Read into the whole graph's message, they stayed in its protobuf arena until the graph
    was freed (clearing a field does not return them): every weight quantised so far held at once. The packed
    weights it makes are appended to `added`."""
    import onnx

    alone = onnx.GraphProto()
    loaded = alone.initializer.add()
    loaded.CopyFrom(weight)  # the reference, no bytes
    _read_in(loaded, folder)
    replaced = quantizer.quantize_matmul(node, [alone])
    for tensor in alone.initializer:
        if tensor.name != weight.name:
            own = onnx.TensorProto()  # a message of its own: one of `alone`'s would keep `alone`, fp32 bytes too
            own.CopyFrom(tensor)
            added.append(own)
    return replaced


def _conv_alone(node, weight, folder: Path, block_size: int) -> tuple[list, object]:
    """int4_conv's rewrite of one convolution, its fp32 weight read into a message of its own (as _quantize_alone)."""
    import onnx
    from onnx import numpy_helper

    from .int4_conv import rewrite_conv

    alone = onnx.TensorProto()
    alone.CopyFrom(weight)  # the reference, no bytes
    _read_in(alone, folder)
    return rewrite_conv(node, numpy_helper.to_array(alone), weight.name, block_size)


def _read_in(weight, folder: Path) -> None:
    """Moves a weight's external data into the message, as onnx.load would have read it."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    if uses_external_data(weight):
        load_external_data_for_tensor(weight, str(folder))
        weight.data_location = onnx.TensorProto.DEFAULT
        del weight.external_data[:]


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _write_a_tensor_at_a_time(model, source_dir: Path, dst: Path) -> None:
    """Saves `model` to `dst` with every initializer in `dst`.data: those in memory as they are, those still in the
    source's external data copied from it, one at a time."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    from .tracing import append_bytes, append_external

    name = f"{dst.name}.data"
    initializers = {t.name for t in model.graph.initializer}
    with open(dst.parent / name, "wb", buffering=0) as out:
        for tensor in _get_all_tensors(model):  # initializers, and Constant attributes the tracer wrote outside
            if not uses_external_data(tensor) and tensor.name not in initializers:
                continue
            if uses_external_data(tensor):  # file to file, not through Python
                append_external(tensor, source_dir, out, name)
                continue
            data = tensor.raw_data or onnx.numpy_helper.to_array(tensor).tobytes()
            for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                tensor.ClearField(field)
            append_bytes(tensor, data, out, name)
            del data
    onnx.save(model, str(dst))
