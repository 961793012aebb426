"""4-bit weight-only quantisation a weight at a time (export/stream_quant.py), for graphs past 2 GB: the same graph
as onnxruntime's MatMulNBitsQuantizer and int4_conv write for the whole graph, on a tiny SANA-Sprint's Gemma-2 and
transformer (its Mix-FFN convolutions included) saved with external data."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny_models import tiny_bundle  # noqa: E402

from edgediff.export.quantize import INT4_BLOCK_SIZE, SCHEMES, quantize  # noqa: E402
from edgediff.export.stream_quant import quantize_int4_streaming  # noqa: E402


def _feeds(component: str, session, rng) -> dict:
    """Batch 2; Gemma-2: a prefix of 3 tokens and 5 prompt tokens; the transformer: a 4x4 latent, 6 text tokens."""
    feeds = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 100, (2, 5), dtype=np.int64)
        elif i.name in ("attention_mask", "encoder_attention_mask"):
            feeds[i.name] = np.ones((2, 8 if component == "text_encoder" else 6), np.int64)
        elif i.name.startswith("prefix_"):
            feeds[i.name] = rng.standard_normal([3 if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        elif i.name == "hidden_states":
            feeds[i.name] = rng.standard_normal((2, i.shape[1], 4, 4)).astype(np.float32)
        elif i.name == "encoder_hidden_states":
            feeds[i.name] = rng.standard_normal((2, 6, i.shape[2])).astype(np.float32)
        else:  # timestep, guidance
            feeds[i.name] = rng.uniform(0, 1, (2,)).astype(np.float32)
    return feeds


@pytest.mark.parametrize("component", ["text_encoder", "transformer"])
def test_streamed_4_bit_graph_equals_the_whole_graph_quantisers(models_root, tmp_path, component):
    graph = onnx.load(str(tiny_bundle("tiny-sana-sprint", models_root) / f"{component}.onnx"))
    external = tmp_path / "external" / f"{component}.onnx"
    external.parent.mkdir()
    onnx.save(graph, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    first = next(n.name for n in graph.graph.node if n.op_type == "MatMul")
    whole, streamed = tmp_path / "whole.onnx", tmp_path / "streamed" / f"{component}.onnx"
    streamed.parent.mkdir()
    quantize(external, whole, SCHEMES["int4-weight-only"], exclude=[first])  # onnxruntime's and int4_conv's
    count = quantize_int4_streaming(external, streamed, exclude=[first], block_size=INT4_BLOCK_SIZE)
    nodes = onnx.load(str(streamed), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    blocked_convs = sum(1 for n in nodes if n.op_type == "DequantizeLinear")
    assert count == ops.count("MatMulNBits") + blocked_convs and ops.count("MatMulNBits") > 0
    assert first in {n.name for n in nodes if n.op_type == "MatMul"}  # excluded: still fp32
    assert (blocked_convs > 0) is (component == "transformer")  # SANA's Mix-FFN convolutions
    assert sorted(p.name for p in streamed.parent.iterdir()) == [f"{component}.onnx", f"{component}.onnx.data"]
    session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    feeds = _feeds(component, session, np.random.default_rng(0))
    theirs = session.run(None, feeds)[0]
    ours = ort.InferenceSession(str(streamed), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(ours, theirs)
