"""Precision conversion of exported graphs: fp16 here; int8 and 4-bit in quantize.py."""

from __future__ import annotations

from pathlib import Path

# Kept in fp32 inside fp16 graphs: Resize's scale constants must stay fp32 (the converter otherwise
# breaks the graph, FIELD_NOTES), and normalisations overflow in half precision.
FP16_OP_BLOCK_LIST = [
    "Resize",
    "Upsample",
    "GroupNormalization",
    "InstanceNormalization",
    "LayerNormalization",
    "RandomNormalLike",
    "RandomUniformLike",
    "Range",
    "CumSum",
]


FP16_MAX = 65504.0  # the largest finite half-precision value: activations past it overflow in fp16 graphs

# protobuf cannot serialise a message past 2 GiB, and onnx's in-memory shape inference serialises the model
PROTOBUF_LIMIT = 2**31 - 1


def to_fp16(graph_path: Path):
    """The graph at `graph_path` in fp16 weights and compute, fp32 inputs and outputs (onnxruntime's float16
    converter). The converter needs every tensor's type; past 2 GiB (full-size UNets) they are inferred from
    the file (onnx.shape_inference.infer_shapes_path) instead of in memory, and through onnxruntime's fused
    operators by its symbolic shape inference."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import convert_float_to_float16

    graph_path = Path(graph_path)
    model = onnx.load(str(graph_path), load_external_data=False)  # the structure first: which route it needs
    if any(node.domain == "com.microsoft" for node in model.graph.node):
        # onnx's shape inference stops at onnxruntime's fused operators (NhwcConv, GroupNorm, ...): the types
        # after them stay unknown and the converter casts nothing into the normalisations it keeps in fp32
        # (seen on `--optimize gpu`'s VAE). onnxruntime's symbolic shape inference knows those operators.
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        load_external_data_for_model(model, str(graph_path.parent))
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        typed = True
    elif sum(f.stat().st_size for f in graph_path.parent.iterdir()) > PROTOBUF_LIMIT:
        inferred = graph_path.with_name("inferred.onnx")  # beside the graph: its external-data paths stay valid
        onnx.shape_inference.infer_shapes_path(str(graph_path), str(inferred))
        model = onnx.load(str(inferred))
        inferred.unlink()
        typed = True
    else:
        load_external_data_for_model(model, str(graph_path.parent))
        typed = False  # the converter infers the types in memory
    model = convert_float_to_float16(
        model, keep_io_types=True, op_block_list=FP16_OP_BLOCK_LIST, disable_shape_infer=typed
    )
    return _drop_repeated_nodes(model)


def _drop_repeated_nodes(model):
    """Removes nodes that repeat an earlier node exactly (same name, op, inputs, outputs and attributes).

    onnxruntime < 1.32's float16 converter inserts one fp16->fp32 Cast per blocked consumer of a shared
    tensor, each with the same name and output: an invalid graph (seen with onnxruntime 1.31 on the
    `--optimize gpu` UNet). 1.32 shares one Cast; this does the same for older versions.
    """
    seen, kept = set(), []
    for node in model.graph.node:
        key = node.SerializeToString(deterministic=True) if node.name else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        kept.append(node)
    if len(kept) != len(model.graph.node):
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return model
