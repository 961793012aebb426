"""4-bit weight-only quantisation a weight at a time (export/stream_quant.py), for graphs past 2 GB: the same graph
as onnxruntime's MatMulNBitsQuantizer writes, on a tiny Gemma-2 saved with external data."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from tiny_models import tiny_bundle  # noqa: E402

from edgediff.export.quantize import INT4_BLOCK_SIZE, SCHEMES, quantize  # noqa: E402
from edgediff.export.stream_quant import quantize_int4_streaming  # noqa: E402


def _run(path, feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_streamed_4_bit_graph_equals_onnxruntimes(models_root, tmp_path):
    graph = onnx.load(str(tiny_bundle("tiny-sana-sprint", models_root) / "text_encoder.onnx"))
    external = tmp_path / "external" / "text_encoder.onnx"
    external.parent.mkdir()
    onnx.save(graph, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    matmuls = [n.name for n in graph.graph.node if n.op_type == "MatMul"]
    whole, streamed = tmp_path / "whole.onnx", tmp_path / "streamed" / "text_encoder.onnx"
    streamed.parent.mkdir()
    quantize(external, whole, SCHEMES["int4-weight-only"], exclude=matmuls[:1])  # onnxruntime's, whole graph
    count = quantize_int4_streaming(external, streamed, exclude=matmuls[:1], block_size=INT4_BLOCK_SIZE)
    ops = [n.op_type for n in onnx.load(str(streamed), load_external_data=False).graph.node]
    assert count == ops.count("MatMulNBits") > 0 and matmuls[0] in {
        n.name for n in onnx.load(str(streamed), load_external_data=False).graph.node if n.op_type == "MatMul"
    }
    assert sorted(p.name for p in streamed.parent.iterdir()) == ["text_encoder.onnx", "text_encoder.onnx.data"]
    rng = np.random.default_rng(0)
    session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    feeds = {}
    for i in session.get_inputs():  # a prefix of 3 tokens, 5 prompt tokens, batch 2
        shape = {"input_ids": (2, 5), "attention_mask": (2, 8)}.get(i.name)
        if shape is None:
            shape = [3 if isinstance(d, str) else d for d in i.shape]
            feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
        elif i.name == "input_ids":
            feeds[i.name] = rng.integers(0, 100, shape, dtype=np.int64)
        else:
            feeds[i.name] = np.ones(shape, np.int64)
    np.testing.assert_array_equal(_run(streamed, feeds), _run(whole, feeds))
