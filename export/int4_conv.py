"""4-bit convolution weights: each Conv's weight stored as int4 in blocks of input channels, dequantised by a
DequantizeLinear (opset 21, blocked) in front of the float convolution.

onnxruntime's 4-bit quantiser (MatMulNBits) takes MatMuls only, and most of a UNet's weights are convolutions:
with them in fp32 the 4-bit SD UNet stayed at 2.5 GB, three times the int8-static one. No onnxruntime quantiser
writes weight-only blocked Conv weights, so this small pass does: hand-written for size (0.64 GB for that
UNet), which is what low-memory mode needs. The convolutions themselves still run in fp32.
"""

from __future__ import annotations

import numpy as np

OPSET_BLOCKED_DEQUANTIZE = 21  # DequantizeLinear's block_size and int4 inputs
IR_VERSION_INT4 = 10  # the first IR version with INT4 tensors
INT4_MIN, INT4_MAX = -8, 7


def takes(weight, block_size: int) -> bool:
    """Whether a Conv with this weight initializer (onnx.TensorProto; its data may stay on disk) is rewritten:
    float, 4-D, and at least one whole block of input channels (a first layer on 4 latent channels is not)."""
    from onnx import TensorProto

    return weight.data_type == TensorProto.FLOAT and len(weight.dims) == 4 and weight.dims[1] >= block_size


def quantize_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 of a Conv weight (O, I, kh, kw) in blocks of `block_size` input channels: (values in
    [-7, 7] as int8, of the weight's shape; scales (O, ceil(I / block_size), kh, kw), float32)."""
    out_ch, in_ch = weight.shape[:2]
    blocks = -(-in_ch // block_size)
    padded = np.zeros((out_ch, blocks * block_size, *weight.shape[2:]), np.float32)
    padded[:, :in_ch] = weight
    grouped = padded.reshape(out_ch, blocks, block_size, *weight.shape[2:])
    scales = np.abs(grouped).max(axis=2) / 7.0  # symmetric: +-absmax onto +-7, zero exact
    scales[scales == 0] = 1.0  # an all-zero block
    q = np.clip(np.round(grouped / scales[:, :, None]), -7, 7).astype(np.int8)
    return q.reshape(padded.shape)[:, :in_ch], scales.astype(np.float32)


def dequantize_blocks(q: np.ndarray, scales: np.ndarray, block_size: int) -> np.ndarray:
    """What DequantizeLinear computes from quantize_blocks' output (the reference the tests hold onnxruntime to)."""
    return q.astype(np.float32) * np.repeat(scales, block_size, axis=1)[:, : q.shape[1]]


def _pack(q: np.ndarray) -> bytes:
    """int4 values, two to a byte, the first in the low nibble (ONNX's INT4 layout)."""
    flat = q.ravel().astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return ((flat[1::2] << 4) | flat[0::2]).astype(np.uint8).tobytes()


def rewrite_conv(node, weight: np.ndarray, weight_name: str, block_size: int) -> tuple[list, object]:
    """One Conv's rewrite: its weight as int4 blocks and scales (the initializers to add), and the
    DequantizeLinear node to put in front of it; `node` then reads the dequantised weight."""
    from onnx import TensorProto, helper, numpy_helper

    q, scales = quantize_blocks(weight, block_size)
    q_name, scale_name, deq_name = f"{weight_name}_int4", f"{weight_name}_int4_scale", f"{weight_name}_dequantized"
    initializers = [
        helper.make_tensor(q_name, TensorProto.INT4, list(weight.shape), _pack(q), raw=True),
        numpy_helper.from_array(scales, scale_name),
    ]
    dequantize = helper.make_node(
        "DequantizeLinear",
        [q_name, scale_name],
        [deq_name],
        name=f"{node.name}_weight_dequantize",
        axis=1,
        block_size=block_size,
    )
    node.input[1] = deq_name
    return initializers, dequantize


def raise_opset(model) -> None:
    """Blocked int4 DequantizeLinear needs opset 21 and IR version 10."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version < OPSET_BLOCKED_DEQUANTIZE:
            opset.version = OPSET_BLOCKED_DEQUANTIZE
    model.ir_version = max(model.ir_version, IR_VERSION_INT4)


def reader_counts(graph) -> dict[str, int]:
    """How many nodes read each tensor: a weight shared by several nodes is left fp32."""
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return readers


def quantize_conv_weights(model, exclude: set[str], block_size: int) -> int:
    """Rewrites, in place, every Conv of `model` (onnx.ModelProto, weights loaded) not in `exclude` whose weight is
    an initializer with at least `block_size` input channels per group: its weight becomes int4 blocks with
    scales, dequantised in front of it. Returns how many were rewritten. The graph is raised to opset 21."""
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    readers = reader_counts(graph)
    rewritten, nodes, added, drop = 0, [], [], set()
    for node in graph.node:
        weight_name = node.input[1] if node.op_type == "Conv" and len(node.input) > 1 else None
        tensor = initializers.get(weight_name)
        if tensor is None or node.name in exclude or readers[weight_name] > 1 or not takes(tensor, block_size):
            nodes.append(node)
            continue
        new, dequantize = rewrite_conv(node, numpy_helper.to_array(tensor), weight_name, block_size)
        added += new
        nodes += [dequantize, node]
        drop.add(weight_name)
        rewritten += 1
    if rewritten:
        kept = [t for t in graph.initializer if t.name not in drop]
        del graph.initializer[:]
        graph.initializer.extend(kept + added)
        del graph.node[:]
        graph.node.extend(nodes)
        raise_opset(model)
    return rewritten
