"""Nearest 2x upsampling followed by a 3x3 convolution, rewritten as four 2x2 convolutions on the small
image whose outputs DepthToSpace interleaves: the same output from 4/9 of the multiply-adds.

Every output pixel of a 3x3 convolution over a nearest-upsampled image sees only a 2x2 window of the small
image, with the kernel's taps summed where they land on the same small pixel; which window, and which sums,
depends on the pixel's place (its phase) in its 2x2 cell. So each of the four phases is a 2x2 convolution of
the small image (padded on the side its window reaches past), and DepthToSpace puts the four back in their
cells. onnxruntime offers no such fusion, and these convolutions are among the largest of the VAE decoders
(SANA's DC-AE: five of them, a sixth of its time at 512) and of the UNets' up blocks, hence this hand-written
rewrite. Exact in real arithmetic; in floating point the summed taps round differently, well inside the graphs'
check against PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Which of the 3x3 kernel's rows (or columns) each of a phase's two taps sums: phase 0's window starts one
# small pixel before its own (rows -1 and 0 of the upsampled image fall on it), phase 1's at its own.
_TAPS = {0: np.array([[1, 0, 0], [0, 1, 1]]), 1: np.array([[1, 1, 0], [0, 0, 1]])}
_EXACT_NEAREST = {"floor", "round_prefer_floor"}  # with "asymmetric" coordinates, both give x // 2 at scale 2
# Narrower convolutions stay as they are: with few channels a convolution is bound by memory, not multiply-adds,
# and the interleaving's extra pass cancels the saving (the full-size tiny decoder, 64 channels, on 2 AVX2 cores:
# fp32 no faster, static int8 0.54 s against 0.50 s); from 128 channels (every VAE decoder, DC-AE, UNet) it pays.
MIN_CHANNELS = 128


def _attrs(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant(name: str, constants: dict, initializers: dict, weights_dir: Path | None = None):
    """A Constant node's or initializer's value (an external one read from `weights_dir`); None for anything
    else, and for external weights when no folder is given."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if name in constants:
        return numpy_helper.to_array(constants[name])
    if name in initializers:
        tensor = initializers[name]
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        if weights_dir is not None:
            return numpy_helper.to_array(tensor, str(weights_dir))
    return None


class _ExternalWriter:
    """Places a rewritten convolution's new kernels in the external-data file its old kernel lay in: the first
    ones in the old kernel's bytes, as far as they fit (two of the four phases: 8/9 of them), the rest appended,
    so that the file grows by what the rewrite adds and keeps at most 1/9 of the old kernel unreferenced."""

    ALIGN = 4096  # appended tensors start on a page, as memory-mapping wants

    def __init__(self, weights_dir: Path, old):
        from onnx.external_data_helper import ExternalDataInfo

        info = ExternalDataInfo(old)
        self.location = info.location
        self.path = Path(weights_dir) / info.location
        self.free_offset, self.free = int(info.offset or 0), int(info.length or self.path.stat().st_size)

    def place(self, tensor, data: bytes) -> None:
        from .tracing import place_external

        with open(self.path, "r+b") as f:
            if len(data) <= self.free:
                offset = self.free_offset
                self.free_offset += len(data)
                self.free -= len(data)
            else:
                f.seek(0, 2)
                offset = -(-f.tell() // self.ALIGN) * self.ALIGN
            f.seek(offset)
            f.write(data)
        tensor.ClearField("raw_data")
        place_external(tensor, self.location, offset, len(data))


def _doubles(resize, constants, initializers) -> bool:
    """Whether this Resize is a nearest 2x upsampling of an NCHW tensor's height and width."""
    attrs = _attrs(resize)
    if (
        attrs.get("mode", b"nearest") != b"nearest"
        or attrs.get("coordinate_transformation_mode", b"half_pixel") != b"asymmetric"
        or attrs.get("nearest_mode", b"round_prefer_floor").decode() not in _EXACT_NEAREST
        or len(resize.input) < 3
        or (len(resize.input) > 3 and resize.input[3])  # output sizes given instead of scales
    ):
        return False
    scales = _constant(resize.input[2], constants, initializers)
    return scales is not None and scales.tolist() == [1.0, 1.0, 2.0, 2.0]


def _plain_3x3(conv) -> bool:
    attrs = _attrs(conv)
    return (
        list(attrs.get("kernel_shape", [3, 3])) == [3, 3]
        and list(attrs.get("pads", [0, 0, 0, 0])) == [1, 1, 1, 1]
        and list(attrs.get("strides", [1, 1])) == [1, 1]
        and list(attrs.get("dilations", [1, 1])) == [1, 1]
        and attrs.get("group", 1) == 1
        and attrs.get("auto_pad", b"NOTSET") == b"NOTSET"
    )


def phase_kernels(weight: np.ndarray) -> dict[tuple[int, int], np.ndarray]:
    """The four 2x2 kernels, by phase (row, column), that a 3x3 kernel (out, in, 3, 3) becomes after a
    nearest 2x upsampling; summed in float64 and returned in the kernel's own dtype. Rows, then columns, each summed
    by one matrix product (tensordot): a three-operand einsum loops in C instead, 3x slower (5 s of full-size SD-Turbo's
    export went to its UNet's and VAE decoder's kernels)."""
    w = weight.astype(np.float64)
    taps = {phase: t.astype(np.float64) for phase, t in _TAPS.items()}
    kernels = {}
    for a in (0, 1):
        rows = np.tensordot(w, taps[a], axes=([2], [1]))  # (out, in, x, row): the rows each tap sums
        for b in (0, 1):
            kernels[(a, b)] = np.tensordot(rows, taps[b], axes=([2], [1])).astype(weight.dtype)  # (out, in, row, col)
    return kernels


def subpixel_upsample_convs(model, weights_dir: Path | None = None, min_channels: int | None = None) -> int:
    """Rewrites, in place, each nearest 2x Resize feeding only a plain 3x3 convolution with constant weights
    (stride 1, padding 1, one group, at least `min_channels` in and out: MIN_CHANNELS unless given) as four 2x2
    convolutions and a DepthToSpace; returns how many.

    `weights_dir`: the folder of the graph's external-data file, for graphs whose weights lie outside them; the
    new kernels are then written into that file (_ExternalWriter), which is changed in place. Without it,
    convolutions whose weights lie outside are left as they are."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    graph = model.graph
    constants = {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    rewritten = 0
    for resize in [n for n in graph.node if n.op_type == "Resize"]:
        users = consumers.get(resize.output[0], [])
        if len(users) != 1 or resize.output[0] in outputs or not _doubles(resize, constants, initializers):
            continue
        conv = users[0]
        if conv.op_type != "Conv" or conv.input[0] != resize.output[0] or not _plain_3x3(conv):
            continue
        weight = _constant(conv.input[1], constants, initializers, weights_dir)
        if weight is None or weight.ndim != 4 or min(weight.shape[:2]) < min_channels:
            continue
        old = initializers.get(conv.input[1])
        outside = old is not None and uses_external_data(old) and len(consumers[conv.input[1]]) == 1
        writer = _ExternalWriter(weights_dir, old) if outside else None
        stem = conv.name or conv.output[0]
        phases = []
        new_nodes = []
        for (a, b), kernel in phase_kernels(weight).items():
            kernel_name = f"{stem}_phase{a}{b}_weight"
            tensor = numpy_helper.from_array(kernel, kernel_name)
            if writer is not None:
                writer.place(tensor, kernel.tobytes())
            graph.initializer.append(tensor)
            phase = f"{stem}_phase{a}{b}"
            inputs = [resize.input[0], kernel_name] + list(conv.input[2:3])
            # ONNX pads: [top, left, bottom, right]; phase 0 reaches one small pixel up (left), phase 1 down (right)
            new_nodes.append(
                helper.make_node("Conv", inputs, [phase], name=phase, kernel_shape=[2, 2], pads=[1 - a, 1 - b, a, b])
            )
            phases.append(phase)
        stacked = f"{stem}_phases"
        new_nodes.append(helper.make_node("Concat", phases, [stacked], name=stacked, axis=1))
        # DCR: channel (row phase * 2 + column phase) * out + c lands at (2y + row phase, 2x + column phase)
        new_nodes.append(
            helper.make_node(
                "DepthToSpace", [stacked], [conv.output[0]], name=f"{stem}_interleave", blocksize=2, mode="DCR"
            )
        )
        at = list(graph.node).index(conv)
        for offset, node in enumerate(new_nodes):
            graph.node.insert(at + offset, node)
        graph.node.remove(conv)
        graph.node.remove(resize)
        _drop_if_unused(graph, conv.input[1], consumers, initializers)
        _drop_if_unused(graph, resize.input[2], consumers, initializers)
        rewritten += 1
    return rewritten


def _drop_if_unused(graph, name: str, consumers: dict, initializers: dict) -> None:
    """Removes the initializer or Constant node behind `name` when the node just removed was its only user."""
    if len(consumers.get(name, [])) != 1:
        return
    if name in initializers:
        graph.initializer.remove(initializers.pop(name))
        return
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            graph.node.remove(node)
            return
