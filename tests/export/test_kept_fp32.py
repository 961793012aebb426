"""Blocks kept in fp32 put back into the graph quantised whole (kept_fp32.py): the fp32 graph when every node is put
back, the quantised graph when none is, and onnxruntime's quantiser's graph with the kept nodes excluded between."""

import numpy as np
import pytest
from tiny_models import tiny_bundle

pytest.importorskip("torch")

# float32 arithmetic in another order (the restored graph's nodes are the fp32 graph's own)
SAME_AS_FP32 = 1e-5


SCHEMES = ["int8-static", "int8-dynamic", "int4-weight-only"]


@pytest.fixture(scope="module", params=[(c, s) for c in ("unet", "text_encoder") for s in SCHEMES], ids=str)
def quantised(models_root, tmp_path_factory, request):
    """A tiny graph, its int8-static graph (no block kept), its feeds and ranges, its blocks and the nodes of the
    quantised op types."""
    import onnx

    from edgediff.export.calibration import record_feeds
    from edgediff.export.quantize import SCHEMES as QUANTISERS
    from edgediff.export.quantize import quantizable_blocks, quantize
    from edgediff.export.ranges import calibrate

    component, scheme_name = request.param
    src = tiny_bundle("tiny-sd1", models_root) / f"{component}.onnx"
    feeds = record_feeds(src.parent, prompts=["a cat", "a dog"])[component]
    scheme = QUANTISERS[scheme_name]
    ranges = calibrate(src, scheme, feeds) if scheme.calibrated else None
    folder = tmp_path_factory.mktemp("kept")
    everything = folder / "all.onnx"
    quantize(src, everything, scheme, [], ranges)
    structure = onnx.load(str(src), load_external_data=False)
    blocks = quantizable_blocks(structure, scheme)
    typed = {n.name for n in structure.graph.node if n.op_type in scheme.op_types}  # what the quantiser changes
    return src, everything, feeds, ranges, blocks, typed, scheme


def _outputs(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [out for feed in feeds for out in session.run(None, feed)]


def _rel(got, ref):
    return float(np.sqrt(sum(np.sum((g - r) ** 2) for g, r in zip(got, ref)) / sum(np.sum(r**2) for r in ref)))


def _ops(path):
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_every_node_put_back_is_the_fp32_graph(quantised, tmp_path):
    from edgediff.export.kept_fp32 import restore_fp32

    src, everything, feeds, _, _, typed, _ = quantised
    restore_fp32(everything, src, tmp_path / "back.onnx", typed, typed)
    assert sorted(_ops(tmp_path / "back.onnx")) == sorted(_ops(src))
    assert _rel(_outputs(tmp_path / "back.onnx", feeds), _outputs(src, feeds)) < SAME_AS_FP32


def test_no_node_put_back_is_the_quantised_graph(quantised, tmp_path):
    from edgediff.export.kept_fp32 import restore_fp32

    src, everything, feeds, _, _, typed, _ = quantised
    restore_fp32(everything, src, tmp_path / "same.onnx", set(), typed)
    assert _ops(tmp_path / "same.onnx") == _ops(everything)
    for got, ref in zip(_outputs(tmp_path / "same.onnx", feeds), _outputs(everything, feeds)):
        assert np.array_equal(got, ref)


def _with_external_data(path, folder):
    """A copy of the graph at `path` in `folder`, every weight in a data file beside it (as large graphs are)."""
    import onnx

    folder.mkdir()
    onnx.save_model(onnx.load(str(path)), str(folder / path.name), save_as_external_data=True, size_threshold=0)
    return folder / path.name


@pytest.mark.parametrize("large", [False, True])
def test_kept_blocks_read_their_fp32_weights_and_the_rest_stays_quantised(quantised, tmp_path, monkeypatch, large):
    """With `large`, both graphs keep their weights in external data and the result is past the size where the
    bundle keeps a graph's weights beside it."""
    import onnx
    from onnx import numpy_helper

    from edgediff.export import quantize as quantize_module
    from edgediff.export.kept_fp32 import restore_fp32
    from edgediff.export.quantize import quantize

    src, everything, feeds, ranges, blocks, typed, scheme = quantised
    names = sorted(blocks)
    kept = names[: len(names) // 2]
    nodes = {n for b in kept for n in blocks[b]}
    if large:
        src, everything = _with_external_data(src, tmp_path / "src"), _with_external_data(everything, tmp_path / "q")
        monkeypatch.setattr(quantize_module, "LARGE_GRAPH_BYTES", 0)
    restore_fp32(everything, src, tmp_path / "kept.onnx", nodes, typed)
    # weights beside it where the quantiser wrote them so (a weight at a time: the dynamic scheme) or past the limit
    beside = large or everything.with_name(f"{everything.name}.data").exists()
    assert (tmp_path / "kept.onnx.data").exists() == beside
    restored = onnx.load(str(tmp_path / "kept.onnx"))
    fp32 = onnx.load(str(src))
    weights = {t.name: numpy_helper.to_array(t) for t in fp32.graph.initializer}
    have = {t.name: numpy_helper.to_array(t) for t in restored.graph.initializer}
    originals = {n.name: n for n in fp32.graph.node}
    quantised_nodes = {n.name: n for n in onnx.load(str(everything)).graph.node}
    for node in restored.graph.node:
        if node.name in nodes:  # its own fp32 weights, not their Dequantize
            for ours, theirs in zip(node.input, originals[node.name].input):
                if theirs in weights:
                    assert ours == theirs and np.array_equal(have[ours], weights[theirs])
        elif node.name in typed and node.name in quantised_nodes:  # still quantised: as the quantiser left it
            assert list(node.input) == list(quantised_nodes[node.name].input)
    # onnxruntime's quantiser with those nodes left out, on the same ranges: the same graph, the same outputs
    excluded = tmp_path / "excluded.onnx"
    quantize(src, excluded, scheme, sorted(nodes), ranges)
    ours_ops, theirs_ops = _ops(tmp_path / "kept.onnx"), _ops(excluded)
    if scheme.name == "int8-dynamic":  # its quantiser writes every Gemm as MatMul + Add, those it leaves fp32 too
        ours_ops = [o for op in ours_ops for o in (("MatMul", "Add") if op == "Gemm" else (op,))]
    assert sorted(ours_ops) == sorted(theirs_ops)
    for ours, theirs in zip(_outputs(tmp_path / "kept.onnx", feeds), _outputs(excluded, feeds)):
        assert np.array_equal(ours, theirs)
