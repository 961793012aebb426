"""Weight quantisation a weight at a time (export/stream_quant.py; dynamic int8 at any size, 4-bit for graphs past
2 GB): the same graphs as
onnxruntime's MatMulNBitsQuantizer and int4_conv (4-bit) and its quantize_dynamic (int8) write for the whole graph,
on a tiny SANA-Sprint's Gemma-2 and transformer (its Mix-FFN convolutions included) saved with external data."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from tiny_models import tiny_bundle  # noqa: E402

from edgediff.export.quantize import INT4_BLOCK_SIZE, SCHEMES, WEIGHT_REDUCE_RANGE, quantize  # noqa: E402
from edgediff.export.stream_quant import quantize_int4_streaming, quantize_int8_dynamic_streaming  # noqa: E402


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


def _external(models_root, tmp_path, component: str):
    """The tiny bundle's graph saved with every weight in external data, as graphs past 2 GB are."""
    graph = onnx.load(str(tiny_bundle("tiny-sana-sprint", models_root) / f"{component}.onnx"))
    external = tmp_path / "external" / f"{component}.onnx"
    external.parent.mkdir()
    onnx.save(graph, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return graph, external


def _assert_one_data_file_and_the_same_outputs(component: str, whole, streamed):
    """The streamed graph is written as one graph file and one data file, and runs as the whole-graph one does."""
    assert sorted(p.name for p in streamed.parent.iterdir()) == [f"{component}.onnx", f"{component}.onnx.data"]
    session = ort.InferenceSession(str(whole), providers=["CPUExecutionProvider"])
    feeds = _feeds(component, session, np.random.default_rng(0))
    theirs = session.run(None, feeds)[0]
    ours = ort.InferenceSession(str(streamed), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("component", ["text_encoder", "transformer"])
def test_streamed_4_bit_graph_equals_the_whole_graph_quantisers(models_root, tmp_path, component):
    graph, external = _external(models_root, tmp_path, component)
    first = next(n.name for n in graph.graph.node if n.op_type == "MatMul")
    whole, streamed = tmp_path / "whole.onnx", tmp_path / "streamed" / f"{component}.onnx"
    streamed.parent.mkdir()
    quantize(external, whole, SCHEMES["int4-weight-only"], exclude=[first])  # onnxruntime's and int4_conv's
    count = quantize_int4_streaming(external, streamed, exclude=[first], block_size=INT4_BLOCK_SIZE)
    model = onnx.load(str(streamed), load_external_data=False)
    nodes = model.graph.node
    # every operator's domain declared (MatMulNBits': com.microsoft), as tools other than onnxruntime need
    assert {n.domain for n in nodes} - {"", "ai.onnx"} <= {o.domain for o in model.opset_import}
    ops = [n.op_type for n in nodes]
    blocked_convs = sum(1 for n in nodes if n.op_type == "DequantizeLinear")
    assert count == ops.count("MatMulNBits") + blocked_convs and ops.count("MatMulNBits") > 0
    assert first in {n.name for n in nodes if n.op_type == "MatMul"}  # excluded: still fp32
    assert (blocked_convs > 0) is (component == "transformer")  # SANA's Mix-FFN convolutions
    _assert_one_data_file_and_the_same_outputs(component, whole, streamed)


@pytest.mark.parametrize("component", ["text_encoder", "transformer"])
def test_streamed_int8_graph_equals_quantize_dynamics(models_root, tmp_path, component):
    graph, external = _external(models_root, tmp_path, component)
    scheme = SCHEMES["int8-dynamic"]
    first = next(n.name for n in graph.graph.node if n.op_type == "MatMul")
    whole, streamed = tmp_path / "whole.onnx", tmp_path / "streamed" / f"{component}.onnx"
    streamed.parent.mkdir()
    # onnxruntime's quantize_dynamic on the whole graph, with quantize()'s settings
    quantize_dynamic(
        str(external),
        str(whole),
        op_types_to_quantize=list(scheme.op_types),
        per_channel=True,
        reduce_range=WEIGHT_REDUCE_RANGE,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=[first],
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    count = quantize_int8_dynamic_streaming(external, streamed, list(scheme.op_types), exclude=[first])
    ours_model = onnx.load(str(streamed))
    theirs_model = onnx.load(str(whole))
    assert [(n.op_type, list(n.input), list(n.output)) for n in ours_model.graph.node] == [
        (n.op_type, list(n.input), list(n.output)) for n in theirs_model.graph.node
    ]
    ours_weights = {t.name: onnx.numpy_helper.to_array(t) for t in ours_model.graph.initializer}
    theirs_weights = {t.name: onnx.numpy_helper.to_array(t) for t in theirs_model.graph.initializer}
    assert ours_weights.keys() == theirs_weights.keys()
    for name, value in theirs_weights.items():
        np.testing.assert_array_equal(ours_weights[name], value, err_msg=name)
    # weights, each once however many MatMuls share it
    assert count == sum(name.endswith("_quantized") for name in ours_weights) > 0
    assert first in {n.name for n in ours_model.graph.node}  # excluded: still fp32
    _assert_one_data_file_and_the_same_outputs(component, whole, streamed)


def test_quantize_streams_dynamic_int8(models_root, tmp_path, monkeypatch):
    """quantize() hands dynamic int8 to the streaming quantiser, never to quantize_dynamic, which would hold the
    whole graph."""
    import onnxruntime.quantization

    _, external = _external(models_root, tmp_path, "text_encoder")

    def whole_graph(*args, **kwargs):
        raise AssertionError("quantize_dynamic holds the whole graph")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", whole_graph)
    dst = tmp_path / "streamed" / "text_encoder.onnx"
    dst.parent.mkdir()
    quantize(external, dst, SCHEMES["int8-dynamic"], exclude=[])
    assert (dst.parent / "text_encoder.onnx.data").exists()
    assert "MatMulInteger" in {n.op_type for n in onnx.load(str(dst), load_external_data=False).graph.node}


def test_an_excluded_gemm_stays_fp32(models_root, tmp_path):
    """onnxruntime's dynamic quantiser turns every Gemm into a MatMul named after it before it reads the exclusions:
    the Gemm's own name must still keep it fp32 (a block kept by --keep auto holds the UNet's time projections)."""
    src = tiny_bundle("tiny-sd1", models_root) / "unet.onnx"
    gemm = next(n for n in onnx.load(str(src), load_external_data=False).graph.node if n.op_type == "Gemm")
    dst = tmp_path / "unet.onnx"
    quantize(src, dst, SCHEMES["int8-dynamic"], exclude=[gemm.name])
    nodes = onnx.load(str(dst), load_external_data=False).graph.node
    reads_weight = [n.op_type for n in nodes if gemm.input[1] in n.input or f"{gemm.input[1]}_Transposed" in n.input]
    assert reads_weight and "MatMulInteger" not in reads_weight and "DynamicQuantizeLinear" not in reads_weight


def test_a_streamed_4_bit_graph_declares_the_domain_of_its_new_operators(models_root, tmp_path):
    """A graph with no onnxruntime operator of its own (an SD UNet) gains MatMulNBits, whose domain (com.microsoft)
    the graph must then declare: onnxruntime runs it either way, other tools (onnx's and onnxruntime's shape
    inference, the MAC counter) refuse it."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    graph = onnx.load(str(tiny_bundle("tiny-sd1", models_root) / "unet.onnx"))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # the case this is about
    del graph.opset_import[:]
    graph.opset_import.append(onnx.helper.make_opsetid("", 17))
    external = tmp_path / "external" / "unet.onnx"
    external.parent.mkdir()
    onnx.save(graph, str(external), save_as_external_data=True, location="weights.bin", size_threshold=0)
    streamed = tmp_path / "streamed" / "unet.onnx"
    streamed.parent.mkdir()
    assert quantize_int4_streaming(external, streamed, exclude=[], block_size=INT4_BLOCK_SIZE) > 0
    model = onnx.load(str(streamed), load_external_data=False)
    assert "MatMulNBits" in {n.op_type for n in model.graph.node}
    assert ("com.microsoft", 1) in {(o.domain, o.version) for o in model.opset_import}
    # raised "No opset import for domain com.microsoft"
    SymbolicShapeInference.infer_shapes(onnx.load(str(streamed)), auto_merge=True)
