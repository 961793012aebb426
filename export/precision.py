"""Precision conversion of exported graphs: fp16 here; int8 and 4-bit in quantize.py."""

from __future__ import annotations

PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
QUANTISED = ("int8", "int8-static", "int4")  # made from the checked fp32 graphs, after the bundle is otherwise complete
# Kept in fp32 inside fp16 graphs: Resize's scale constants must stay fp32 (the converter otherwise
# breaks the graph, FIELD_NOTES), and normalisations overflow in half precision.
FP16_OP_BLOCK_LIST = ["Resize", "Upsample", "GroupNormalization", "InstanceNormalization", "LayerNormalization",
                      "RandomNormalLike", "RandomUniformLike", "Range", "CumSum"]


def to_fp16(model):
    """fp16 weights and compute, fp32 inputs and outputs (onnxruntime's float16 converter)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(model, keep_io_types=True, op_block_list=FP16_OP_BLOCK_LIST)
