"""The denoiser exported in segments (`--segments N`, export/segments.py): the same images as the whole graph,
in every mode, with each segment holding part of the weights and low-memory mode holding one segment at a time."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("optimum.exporters.onnx")

from tiny_models import tiny_bundle, tiny_sd3_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Pipeline
from edgediff.runtime.errors import BundleError, ExportOptionsError

# segmented and whole graphs run the same operators on the same weights; only fusions across a cut may differ
SAME_IMAGE = 1e-4
SEGMENTS = 3


def _export(models_root, arch, precision, segments, out, **options):
    from edgediff.export import export
    from edgediff.export.options import ExportOptions

    options = ExportOptions(precision=precision, segments=segments, **options)
    return export(str(tiny_source(arch, models_root)), out, options, progress=False)


def _image(path, low_memory=False, **call):
    with Pipeline.from_bundle(path, provider="cpu", low_memory=low_memory) as pipe:
        image = pipe("a red circle", seed=0, num_inference_steps=2, output_type="np", **call).images
        return image, pipe.sessions


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_a_segmented_unet_draws_the_whole_graphs_image_in_either_mode(models_root, tmp_path, precision):
    whole = tiny_bundle("tiny-sd-turbo", models_root) if precision == "fp32" else None
    if whole is None:
        whole = _export(models_root, "tiny-sd-turbo", precision, 1, tmp_path / "whole")
    path = _export(models_root, "tiny-sd-turbo", precision, SEGMENTS, tmp_path / "segmented")
    manifest = json.loads((path / "manifest.json").read_text())
    unet = manifest["components"]["unet"]
    segments = unet["attributes"]["segments"]
    assert len(segments) == SEGMENTS
    assert not (path / "unet.onnx").exists()
    assert unet["attributes"]["segments_check"]["max_rel_diff"]["out_sample"] <= SAME_IMAGE
    # every file of every segment is listed with its checksum, and each segment holds part of the weights
    listed = [f for s in segments for f in s["files"]]
    assert sorted(listed) == sorted(unet["files"])
    total = sum(m["size"] for m in unet["files"].values())
    for s in segments:
        assert sum(unet["files"][f]["size"] for f in s["files"]) < 0.75 * total
    # the first segment takes the graph's inputs, the last makes its output
    assert {t["name"] for t in segments[0]["inputs"]} <= {t["name"] for t in unet["inputs"]}
    assert [t["name"] for t in segments[-1]["outputs"]] == ["out_sample"]

    for low_memory in (False, True):
        expected, _ = _image(whole, low_memory)
        got, sessions = _image(path, low_memory)
        np.testing.assert_allclose(got, expected, atol=SAME_IMAGE)
    # low memory: no segment stays open after the call; otherwise all stay open
    with Pipeline.from_bundle(path, provider="cpu", low_memory=True) as pipe:
        opened = []
        unet_session = None

        def watch(event):
            nonlocal unet_session
            unet_session = pipe.sessions.get("unet")
            opened.append(unet_session.segments_open)

        pipe("a red circle", seed=0, num_inference_steps=2, callback=watch)
        assert opened and all(n == 0 for n in opened)
    with Pipeline.from_bundle(path, provider="cpu") as pipe:
        assert pipe.sessions.get("unet").segments_open == SEGMENTS


def test_a_segmented_transformer_draws_the_whole_graphs_image(models_root, tmp_path):
    whole = tiny_sd3_bundle(models_root)
    path = _export(models_root, "tiny-sd3", "fp32", 2, tmp_path / "segmented")
    expected, _ = _image(whole)
    got, _ = _image(path)
    np.testing.assert_allclose(got, expected, atol=SAME_IMAGE)


def test_segments_that_cannot_be_cut_or_combined_are_refused(tmp_path):
    from edgediff.export.options import ExportOptions

    for value in (0, -1, 1.5, True):
        with pytest.raises(ExportOptionsError, match="--segments must be at least 1"):
            ExportOptions(segments=value)
    with pytest.raises(ExportOptionsError, match="--lora-slots"):
        ExportOptions(segments=2, lora_slots="attention")
    with pytest.raises(ExportOptionsError, match="--segments"):
        ExportOptions(target="coreml", segments=2)


def test_a_manifest_whose_segment_names_an_unlisted_file_is_refused(models_root, tmp_path):
    path = _export(models_root, "tiny-sd-turbo", "fp32", 2, tmp_path / "segmented")
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["components"]["unet"]["attributes"]["segments"][1]["files"] = ["../elsewhere.onnx"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed"):
        Pipeline.from_bundle(broken, provider="cpu")


def test_plan_keeps_weights_and_their_static_readers_out_of_the_crossings():
    """Weights, Constant nodes and nodes that read only weights (a shared weight's Identity, a 4-bit weight's
    DequantizeLinear) are copied into the segment that reads them, never passed across a cut."""
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.export.segments import plan_segments

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    weights = [numpy_helper.from_array(np.eye(4, dtype=np.float32) * (i + 1), f"w{i}") for i in range(4)]
    # every weight's reader up front, as exporters put them
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"v{i}"]) for i in range(4)]
    nodes.append(helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(4, np.float32))))
    names = ["x", "h0", "h1", "h2", "y"]
    for i in range(4):
        nodes.append(helper.make_node("MatMul", [names[i], f"v{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", "c"], [names[i + 1]]))
    graph = helper.make_graph(nodes, "g", [x], [y], weights)
    segments = plan_segments(graph, 2)
    assert len(segments) == 2
    assert segments[0].inputs == ["x"] and segments[1].outputs == ["y"]
    # one activation crosses (after the second MatMul or its Add: the same weight either side), nothing static does
    assert segments[0].outputs == segments[1].inputs and segments[1].inputs in (["m1"], ["h1"])
    assert [sorted(s.initializers) for s in segments] == [["w0", "w1"], ["w2", "w3"]]
    ops = [[n.op_type for n in s.nodes] for s in segments]
    assert all(o.count("Constant") == 1 and o.count("Identity") == 2 for o in ops)
