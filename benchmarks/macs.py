"""Multiply-accumulates of an ONNX graph, counted from the graph itself at given input shapes.

Counts the ops that carry the compute of diffusion models: Conv, ConvTranspose, MatMul (attention
and projections), Gemm, and the fused forms onnxruntime's optimiser may leave (MatMulNBits,
QLinearConv, ConvInteger, MatMulInteger). Elementwise ops are ignored (memory-bound, not MACs).
Hand-written because no maintained library counts from ONNX with symbolic shapes resolved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SMALL_CONSTANT_ELEMENTS = (
    1 << 16
)  # up to this size (biases, reshape targets) read for shape inference; big weights never


def _static_model(path: Path, input_shapes: dict[str, tuple]):
    import onnx
    from onnx.external_data_helper import _get_all_tensors, load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(path), load_external_data=False)  # structure only: weights' dims are in the proto
    # initializers and Constant nodes' values alike: a large graph's exporter may have put either outside it
    for tensor in _get_all_tensors(model):
        # Shape inference reads small constants (reshape targets); load those, never the big weights.
        small = int(np.prod(tensor.dims)) <= SMALL_CONSTANT_ELEMENTS
        if uses_external_data(tensor) and small:
            load_external_data_for_tensor(tensor, str(path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
        elif not small:
            tensor.ClearField("raw_data")  # weights stored inline: drop them before inference copies the model
    for inp in model.graph.input:
        if inp.name in input_shapes:
            dims = inp.type.tensor_type.shape.dim
            for d, value in zip(dims, input_shapes[inp.name]):
                d.ClearField("dim_param")
                d.dim_value = int(value)
    # onnxruntime's symbolic shape inference follows the computed Reshape shapes of attention blocks
    # that onnx's own inference gives up on.
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    return SymbolicShapeInference.infer_shapes(model, auto_merge=True)


def _shapes(model) -> dict[str, tuple]:
    shapes = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(d.dim_value for d in dims)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else list(a.ints)
    return default


def count_macs(path: str | Path, input_shapes: dict[str, tuple]) -> dict:
    """{"total": MACs, "by_op": {op: MACs}, "uncounted": [nodes whose shapes stayed unknown]}."""
    model = _static_model(Path(path), input_shapes)
    shapes = _shapes(model)
    by_op: dict[str, int] = {}
    uncounted = []
    for node in model.graph.node:
        op = node.op_type
        if op not in (
            "Conv",
            "ConvTranspose",
            "MatMul",
            "Gemm",
            "QLinearConv",
            "ConvInteger",
            "MatMulInteger",
            "QLinearMatMul",
            "MatMulNBits",
        ):
            continue
        out = shapes.get(node.output[0])
        if out is None:
            uncounted.append(node.name or op)
            continue
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shapes.get(node.input[3 if op == "QLinearConv" else 1])
            if w is None:
                uncounted.append(node.name or op)
                continue
            macs = int(np.prod(out)) * int(np.prod(w[1:]))  # each output: Cin/group * kH * kW
        elif op == "ConvTranspose":
            w, x = shapes.get(node.input[1]), shapes.get(node.input[0])
            if w is None or x is None:
                uncounted.append(node.name or op)
                continue
            macs = int(np.prod(x)) * int(np.prod(w[1:]))  # each input: Cout/group * kH * kW
        elif op == "MatMulNBits":
            macs = int(np.prod(out)) * _attr(node, "K", 0)
        else:
            a = shapes.get(node.input[3 if op == "QLinearMatMul" else 0])
            if a is None:
                uncounted.append(node.name or op)
                continue
            k = a[0] if op == "Gemm" and _attr(node, "transA", 0) else a[-1]
            macs = int(np.prod(out)) * int(k)
        by_op[op] = by_op.get(op, 0) + macs
    return {"total": sum(by_op.values()), "by_op": by_op, "uncounted": uncounted}
