"""4-bit convolution weights (export/int4_conv.py): blocks of input channels with one scale each, dequantised by
onnxruntime exactly as the numpy reference says, and the rewritten convolution close to the float one."""

import numpy as np
import pytest

# one int4 step is scale = absmax / 7, so rounding moves a weight by at most half of it
ROUNDING = 0.5


def _conv_model(weight: np.ndarray, name="conv"):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[1], 6, 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name=name, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("in_channels", [32, 48, 96])  # whole blocks, and a last block shorter than the others
def test_blocks_round_within_half_a_step_and_onnxruntime_dequantises_as_numpy(in_channels):
    from edgediff.export.int4_conv import dequantize_blocks, quantize_blocks, quantize_conv_weights

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, in_channels, 3, 3)).astype(np.float32)
    weight[0, :32] = 0.0  # an all-zero block
    q, scales = quantize_blocks(weight, 32)
    assert q.shape == weight.shape and q.min() >= -7 and q.max() <= 7
    assert scales.shape == (8, -(-in_channels // 32), 3, 3)
    reference = dequantize_blocks(q, scales, 32)
    step = np.repeat(scales, 32, axis=1)[:, :in_channels]
    assert np.all(np.abs(reference - weight) <= ROUNDING * step + 1e-7)
    assert np.all(reference[0, :32] == 0.0)

    model = _conv_model(weight)
    assert quantize_conv_weights(model, set(), 32) == 1
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["DequantizeLinear", "Conv"] and "w" not in {t.name for t in model.graph.initializer}
    x = rng.standard_normal((1, in_channels, 6, 6)).astype(np.float32)
    got = _run(model, x)
    expected = _run(_conv_model(reference), x)  # the float Conv on numpy's dequantised weight
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_excluded_and_narrow_convolutions_stay_float():
    from edgediff.export.int4_conv import quantize_conv_weights

    weight = np.ones((4, 16, 3, 3), np.float32)
    narrow = _conv_model(weight)
    assert quantize_conv_weights(narrow, set(), 32) == 0  # fewer input channels than one block
    wide = _conv_model(np.ones((4, 64, 3, 3), np.float32))
    assert quantize_conv_weights(wide, {"conv"}, 32) == 0
    assert [n.op_type for n in wide.graph.node] == ["Conv"]
