"""Graph edits that let onnxruntime's CUDA provider capture a whole graph as a CUDA graph.

Capture needs every node on the GPU (runtime/binding.py). On an H100 the UNet and the VAE decoder captured, and the text encoder was refused: the pooled output of CLIP picks
the end-of-text token with an ArgMax over integers, and onnxruntime's CUDA ArgMax takes floats only, so
that node ran on the CPU behind a copy.
"""

from __future__ import annotations

_INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")


def float_argmax(model) -> int:
    """Casts the integer input of each ArgMax to float32, in place; returns how many were rewritten.

    The integers ArgMax sees in our graphs are token ids and 0/1 end-of-text masks, all below 2^24 and so
    exact in float32; ArgMax keeps the first maximum either way, so the result is the same index. Run after
    the fp16 conversion, which would otherwise turn this float32 into float16 (exact only below 2^11).
    """
    from onnx import TensorProto, helper

    integer = {getattr(TensorProto, name) for name in _INTEGER_TYPES}
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
    for node in graph.node:  # a Cast's output type is its `to`, whatever shape inference recorded
        if node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    rewritten = 0
    nodes = list(graph.node)
    for node in nodes:
        if node.op_type != "ArgMax" or types.get(node.input[0]) not in integer:
            continue
        as_float = f"{node.input[0]}_as_float_for_argmax_{rewritten}"
        cast = helper.make_node(
            "Cast", [node.input[0]], [as_float], to=TensorProto.FLOAT, name=f"{node.name or 'ArgMax'}_float_input"
        )
        graph.node.insert(list(graph.node).index(node), cast)  # before its consumer: the order stays topological
        node.input[0] = as_float
        rewritten += 1
    return rewritten
