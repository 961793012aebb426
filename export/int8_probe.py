"""Whether this CPU runs onnxruntime's int8 kernels faster than its fp32 ones, measured in about a second.

Instruction-set flags do not settle it. With AVX-512 VNNI the int8-static UNet ran 2.37x faster than fp32; on
CPUs with AVX2 alone, where int8 dot products take three instructions (vpmaddubsw, vpmaddwd, vpaddd) against
fp32's one FMA, the gain was nil on one machine and real on another (docs/benchmarks.md, "What int8 buys
depends on the CPU"). So `--precision auto` measures: two layers shaped like the UNet's costliest, a 3x3
convolution at its largest level and a feed-forward matrix product, each in fp32 and in the QDQ form that
int8-static bundles use (onnxruntime runs them as QLinearConv and MatMulIntegerToFloat), timed alternately in
one process. Hand-written: onnxruntime offers no such probe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .quantize import WEIGHT_REDUCE_RANGE

# the SD UNet's costliest shapes at 512x512: a 3x3 convolution at 320 channels on the 64x64 level, and the
# feed-forward's first matrix product there (4096 tokens, 320 -> 1280)
CONV_SHAPE = (1, 320, 64, 64)
MATMUL_SHAPE = (4096, 320, 1280)
ROUNDS = 5  # alternating fp32 / int8 calls per layer; the fastest of each counts (the least disturbed)
# int8 counts as faster only past this ratio: below it the difference is within a shared machine's noise, and
# int8-static's quantise/dequantise steps between layers take back what a small kernel gain gives
FASTER_AT = 1.15


@dataclass(frozen=True)
class Int8Probe:
    conv: float  # fp32 time / int8 time, 3x3 convolution
    matmul: float  # fp32 time / int8 time, matrix product

    @property
    def choice(self) -> str:
        """The bundle precision this CPU runs fastest: int8-static (convolutions and matrix products in int8) where
        both gain, int8 (matrix products alone, dynamic) where only they do, fp32 where neither does."""
        if self.conv >= FASTER_AT and self.matmul >= FASTER_AT:
            return "int8-static"
        return "int8" if self.matmul >= FASTER_AT else "fp32"


def _layer_graphs(op: str, w: np.ndarray, axis: int, x_shape: list, requantize: bool, **attributes) -> list:
    """One layer `op` on input x and weight `w`, in fp32 and in the QDQ form int8-static bundles write: uint8
    activations, per-channel int8 weights along `axis` (quantised as the bundles' quantiser does, weight_quant),
    the output quantised again where `requantize` (convolutions; MatMul outputs stay float)."""
    from onnx import TensorProto, helper, numpy_helper

    from .weight_quant import channel_params, quantize_channels

    zero_points, scales = channel_params(w, axis, TensorProto.INT8, WEIGHT_REDUCE_RANGE)
    wq = quantize_channels(w, axis, TensorProto.INT8, zero_points, scales)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    fp32 = helper.make_graph(
        [helper.make_node(op, ["x", "w"], ["y"], **attributes)], op, [x], [y], [numpy_helper.from_array(w, "w")]
    )
    inits = [
        numpy_helper.from_array(wq, "wq"),
        numpy_helper.from_array(scales, "ws"),
        numpy_helper.from_array(zero_points, "wz"),
        numpy_helper.from_array(np.array(0.05, np.float32), "s"),
        numpy_helper.from_array(np.array(128, np.uint8), "z"),
        numpy_helper.from_array(np.array(0.1, np.float32), "so"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=axis),
        helper.make_node(op, ["xd", "wd"], ["o" if requantize else "y"], **attributes),
    ]
    if requantize:
        nodes += [
            helper.make_node("QuantizeLinear", ["o", "so", "z"], ["oq"]),
            helper.make_node("DequantizeLinear", ["oq", "so", "z"], ["y"]),
        ]
    int8 = helper.make_graph(nodes, f"{op}_qdq", [x], [y], inits)
    return [helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]) for g in (fp32, int8)]


def _conv_graphs() -> list:
    c = CONV_SHAPE[1]
    w = np.random.default_rng(0).standard_normal((c, c, 3, 3)).astype(np.float32) * 0.05
    return _layer_graphs("Conv", w, 0, list(CONV_SHAPE), requantize=True, pads=[1, 1, 1, 1])


def _matmul_graphs() -> list:
    m, k, n = MATMUL_SHAPE
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32) * 0.05
    return _layer_graphs("MatMul", w, 1, [1, m, k], requantize=False)


def _ratio(models, shape, threads: int | None) -> float:
    """fp32 time / int8 time, the fastest of ROUNDS alternating calls each."""
    import onnxruntime as ort

    from edgediff.runtime.session_config import session_options

    sessions = [
        ort.InferenceSession(
            m.SerializeToString(), session_options(threads=threads), providers=["CPUExecutionProvider"]
        )
        for m in models
    ]
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    best = [float("inf"), float("inf")]
    for i in range(ROUNDS + 1):
        for j, session in enumerate(sessions):
            start = time.perf_counter()
            session.run(None, {"x": x})
            if i:  # the first call of each warms it up
                best[j] = min(best[j], time.perf_counter() - start)
    return best[0] / best[1]


def probe(threads: int | None = None) -> Int8Probe:
    """fp32 against int8 on this CPU, through onnxruntime's CPU provider."""
    m, k, _ = MATMUL_SHAPE
    return Int8Probe(
        conv=_ratio(_conv_graphs(), CONV_SHAPE, threads),
        matmul=_ratio(_matmul_graphs(), (1, m, k), threads),
    )
