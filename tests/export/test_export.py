"""Export: the bundle it writes, its checks against PyTorch, and atomicity when it fails."""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("optimum")

from tiny_models import graph_contents, tiny_bundle, tiny_source  # noqa: E402

from edgediff.export import bundle_writer, export_bundle  # noqa: E402
from edgediff.runtime import SCHEMA_VERSION, Bundle  # noqa: E402
from edgediff.runtime.errors import ExportError, ExportValidationError  # noqa: E402

SLICED_ATOL = 1e-5  # one head at a time vs scaled_dot_product_attention: fp32 summation order only


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    "arch,family,sampler,embedding",
    [
        ("tiny-sd1", "sd1", "euler", None),
        ("tiny-sd2-v", "sd2-v", "ddim", None),
        ("tiny-sd-turbo", "sd-turbo", "euler", None),
        ("tiny-lcm", "lcm-sd1", "lcm", 16),
    ],
)
def test_manifest_describes_the_bundle(models_root, arch, family, sampler, embedding):
    bundle = Bundle.open(tiny_bundle(arch, models_root))  # full checksum verification
    m = bundle.manifest
    assert m.schema_version == SCHEMA_VERSION
    assert (m.family, m.scheduler["name"], m.guidance_embedding_dim) == (family, sampler, embedding)
    assert m.prediction_type == ("v_prediction" if arch == "tiny-sd2-v" else "epsilon")
    if family == "sd-turbo":
        assert m.scheduler["config"]["timestep_spacing"] == "trailing" and m.defaults["steps"] == 1
    assert m.defaults["height"] == m.defaults["width"] == 64
    assert m.tokenizer["max_length"] == 77
    assert m.provenance["versions"]["torch"] and m.provenance["versions"]["onnx"] and m.provenance["date"]
    unet_inputs = {t.name for t in m.components["unet"].inputs}
    unet_config = json.loads((tiny_source(arch, models_root) / "unet" / "config.json").read_text())
    # its latent grid must halve evenly at every down block but the last (the size rule's part)
    assert m.components["unet"].attributes["latent_multiple"] == 2 ** (len(unet_config["block_out_channels"]) - 1)
    assert unet_inputs == {"sample", "timestep", "encoder_hidden_states"} | ({"timestep_cond"} if embedding else set())
    for spec in m.components.values():
        assert spec.precision == "fp32"
        for name, meta in spec.files.items():
            assert (bundle.path / name).stat().st_size == meta["size"]
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks) == set(m.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    assert all(d <= bundle_writer.TOLERANCES["fp32"] for comp in checks.values() for d in comp.values())


def test_fp16_export_stays_close(models_root):
    """Every part in fp16 when its fp16 graph passes the check (a VAE that overflows stays fp32: test_sdxl)."""
    from edgediff.runtime import Pipeline

    fp16 = Bundle.open(tiny_bundle("tiny-sd1", models_root, precision="fp16"))
    precisions = {k: v.precision for k, v in fp16.manifest.components.items()}
    assert precisions == {"text_encoder": "fp16", "unet": "fp16", "vae_decoder": "fp16", "vae_encoder": "fp16"}
    # most UNet weights are stored in half precision (norms and resize constants stay fp32)
    import onnx

    params = {1: 0, 10: 0}
    for init in onnx.load(str(fp16.component_path("unet"))).graph.initializer:
        if init.data_type in params:
            params[init.data_type] += int(np.prod(init.dims))
    assert params[10] > 4 * params[1]
    fp32 = Bundle.open(tiny_bundle("tiny-sd1", models_root))
    a = Pipeline(fp16)("a red circle", num_inference_steps=2, seed=3, output_type="np").images
    b = Pipeline(fp32)("a red circle", num_inference_steps=2, seed=3, output_type="np").images
    assert np.isfinite(a).all() and np.abs(a - b).max() < 0.05


def test_fp16_past_protobuf_limit_infers_types_from_the_file(models_root, tmp_path, monkeypatch):
    """Graphs past 2 GiB (full-size UNets) cannot be shape-inferred in memory; the converter then gets the
    types inferred from the file. Forced here on a tiny UNet: the same fp16 graph either way."""
    import shutil

    from edgediff.export import precision

    graph = tmp_path / "unet.onnx"
    shutil.copy(Bundle.open(tiny_bundle("tiny-sd1", models_root)).component_path("unet"), graph)
    in_memory = precision.to_fp16(graph)
    monkeypatch.setattr(precision, "PROTOBUF_LIMIT", 0)
    from_file = precision.to_fp16(graph)

    def wiring(model):
        return [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]

    assert wiring(from_file) == wiring(in_memory)
    assert {i.name: i.data_type for i in from_file.graph.initializer} == {
        i.name: i.data_type for i in in_memory.graph.initializer
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]  # the inferred copy is gone


def test_repeated_casts_are_dropped():
    """onnxruntime < 1.32's float16 converter can insert the same Cast twice (same name, same output)."""
    import onnx
    from onnx import TensorProto, helper

    from edgediff.export.precision import _drop_repeated_nodes

    cast = dict(inputs=["x"], outputs=["x32"], to=TensorProto.FLOAT, name="x_cast_to_fp32_node")
    nodes = [
        helper.make_node("Cast", **cast),
        helper.make_node("Cast", **cast),
        helper.make_node("Relu", ["x32"], ["a"], name="relu"),
        helper.make_node("Neg", ["x32"], ["b"], name="neg"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a", "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    fixed = _drop_repeated_nodes(model)
    onnx.checker.check_model(fixed)
    assert [n.name for n in fixed.graph.node] == ["x_cast_to_fp32_node", "relu", "neg"]


def test_existing_output_is_refused(models_root, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), out, progress=False)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="cannot load a diffusers model from"):
        export_bundle(str(tmp_path / "nope"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(ExportError, match="cannot load a diffusers model from 'stabilityai/sd-turbo'"):
        export_bundle("stabilityai/sd-turbo", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _break_unet_check(monkeypatch):
    """The PyTorch side now disagrees with the graph, as a faulty export would."""

    def shifted(pipe, x, _orig=next(c for c in bundle_writer.COMPONENTS if c.name == "unet").torch_call):
        return [y + 1.0 for y in _orig(pipe, x)]

    broken = tuple(
        dataclasses.replace(c, torch_call=shifted) if c.name == "unet" else c for c in bundle_writer.COMPONENTS
    )
    monkeypatch.setattr(bundle_writer, "COMPONENTS", broken)


def test_failed_check_leaves_nothing(models_root, tmp_path, monkeypatch):
    _break_unet_check(monkeypatch)
    out = tmp_path / "bundle"
    with pytest.raises(ExportValidationError, match=r"unet: .*out_sample: max \|diff\|") as err:
        export_bundle(str(tiny_source("tiny-sd1", models_root)), out, progress=False)
    assert err.value.diffs["out_sample"][0] > err.value.diffs["out_sample"][1]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_old_bundle(models_root, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    export_bundle(str(tiny_source("tiny-sd1", models_root)), out, progress=False)
    before = (out / "manifest.json").read_text()
    _break_unet_check(monkeypatch)
    with pytest.raises(ExportValidationError):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), out, overwrite=True, progress=False)
    assert (out / "manifest.json").read_text() == before and _leftovers(tmp_path) == []
    Bundle.open(out)


def test_interrupted_export_leaves_nothing(models_root, tmp_path, monkeypatch):
    real = bundle_writer._save_graph

    def interrupt(model, out_dir, name, **options):
        if name == "unet":
            raise KeyboardInterrupt
        return real(model, out_dir, name, **options)

    monkeypatch.setattr(bundle_writer, "_save_graph", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "bundle", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_manifest_is_plain_json(models_root):
    raw = json.loads((tiny_bundle("tiny-lcm", models_root) / "manifest.json").read_text())
    assert raw["scheduler"]["config"]["original_inference_steps"] == 50
    assert raw["components"]["unet"]["files"]["unet.onnx"]["sha256"]


def test_optimize_fuses_what_it_can_and_stays_checked(models_root, tmp_path):
    from edgediff.runtime import Pipeline

    out = export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "fused", optimize=True, progress=False)
    manifest = Bundle.open(out).manifest
    records = {
        name: manifest.components[name].attributes["optimizer"] for name in ("text_encoder", "unet", "vae_decoder")
    }
    assert records["text_encoder"]["fused_ops"]  # LayerNorm/GELU fusions on the CLIP text encoder
    for record in records.values():  # every graph either fused or says why it was left alone
        assert "fused_ops" in record or record["skipped"]
    assert manifest.provenance["optimized"] is True and manifest.provenance["optimized_for"] == "cpu"
    assert "fused_ops" in records["unet"]  # the UNet's attention fusion (see export/optimize._num_heads)
    assert {"Attention", "MultiHeadAttention"} & set(records["unet"]["fused_ops"])
    plain = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))(
        "a cat", seed=0, num_inference_steps=2, output_type="np"
    )
    fused = Pipeline.from_bundle(out)("a cat", seed=0, num_inference_steps=2, output_type="np")
    np.testing.assert_allclose(fused.images, plain.images, atol=2 / 255)


def test_gpu_optimised_graphs_need_cuda(models_root, tmp_path, monkeypatch):
    """--optimize gpu writes CUDA-only operators: exporting it is refused where CUDA cannot check them, and a
    bundle holding them refuses other providers with a clear error (tests/runtime/test_cuda.py runs one on CUDA)."""
    import onnxruntime as ort

    from edgediff.runtime import Pipeline
    from edgediff.runtime.errors import BundleError, ExportError

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ExportError, match="--optimize gpu"):
            export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "gpu", optimize="gpu", progress=False)
        assert not (tmp_path / "gpu").exists()
    # a bundle whose UNet record says GPU fusions: the CPU provider is refused before any graph opens
    bundle = Bundle.open(tiny_bundle("tiny-sd1", models_root))
    unet = bundle.manifest.components["unet"]
    monkeypatch.setitem(unet.attributes, "optimizer", {"gpu": True, "fused_ops": {"NhwcConv": 1}})
    with pytest.raises(BundleError, match="needs the CUDA provider"):
        Pipeline(bundle, provider="cpu")


def test_gpu_fusions_leave_out_what_their_kernels_may_refuse(models_root, tmp_path):
    """--optimize gpu's graph rewrite runs anywhere (its check needs CUDA): the CUDA-only fusions are there,
    but not BiasSplitGelu, whose kernel takes only a few widths (the tiny UNet's is not one of them)."""
    from edgediff.export.optimize import optimize_graph

    unet = Bundle.open(tiny_bundle("tiny-sd1", models_root)).component_path("unet")
    record = optimize_graph(unet, tmp_path / "fused.onnx", "unet", gpu=True)
    fused = record["fused_ops"]
    assert {"NhwcConv", "GroupNorm", "MultiHeadAttention"} <= set(fused), fused
    assert "BiasSplitGelu" not in fused
    plain = optimize_graph(unet, tmp_path / "cpu.onnx", "unet", gpu=False)["fused_ops"]
    assert not {"NhwcConv", "GroupNorm", "BiasSplitGelu"} & set(plain)


@pytest.mark.parametrize("component", ["vae_decoder", "unet"])
def test_gpu_fused_graphs_convert_to_fp16_with_typed_casts(models_root, tmp_path, component):
    """`--optimize gpu --precision fp16`: every operator kept in fp32 gets fp32 inputs. onnx's own shape
    inference stops at the fused operators, and then the converter left the VAE's attention GroupNorm
    (an InstanceNormalization) with an fp16 input: onnxruntime refused the graph (seen on an H100)."""
    import onnx

    from edgediff.export.optimize import optimize_graph
    from edgediff.export.precision import FP16_OP_BLOCK_LIST, to_fp16

    graph = Bundle.open(tiny_bundle("tiny-sd1", models_root)).component_path(component)
    assert optimize_graph(graph, tmp_path / "fused.onnx", component, gpu=True)["fused_ops"].get("NhwcConv")
    model = to_fp16(tmp_path / "fused.onnx")
    types = {v.name: v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.value_info]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
        if node.op_type == "Constant":
            types[node.output[0]] = next(a.t.data_type for a in node.attribute if a.name == "value")
    blocked = [n for n in model.graph.node if n.op_type in FP16_OP_BLOCK_LIST and n.op_type != "Resize"]
    assert blocked, "the fused graph keeps no operator in fp32: nothing was checked"
    for node in blocked:
        data = node.input[0]
        assert types.get(data) == onnx.TensorProto.FLOAT, (node.name, data, types.get(data))


def _assert_attention_matches_diffusers(source, mode: str, rng, timestep: float) -> None:
    """The tiny UNet with `mode`'s processor gives diffusers' outputs in PyTorch; all 8 of its attention layers
    (self- and cross-attention of its 4 transformer blocks: down, mid, 2 up) take the processor."""
    from diffusers import UNet2DConditionModel

    from edgediff.export.attention import use_attention

    unet = UNet2DConditionModel.from_pretrained(source / "unet").eval()
    args = (
        torch.from_numpy(rng.standard_normal((2, 4, 32, 32)).astype(np.float32)),
        torch.tensor(timestep),
        torch.from_numpy(rng.standard_normal((2, 77, 32)).astype(np.float32)),
    )
    with torch.no_grad():
        reference = unet(*args).sample
        assert use_attention(unet, mode) == 8
        ours = unet(*args).sample
    assert torch.abs(ours - reference).max() <= SLICED_ATOL * max(1.0, float(reference.abs().max()))


def test_split_einsum_attention_is_the_same_arithmetic(models_root):
    """--attention split_einsum (Core ML): the Neural Engine's (batch, channels, 1, tokens) layout, same outputs
    as diffusers' attention in PyTorch (the packages themselves: tests/export/test_coreml.py)."""
    _assert_attention_matches_diffusers(
        tiny_source("tiny-sd-turbo", models_root), "split_einsum", np.random.default_rng(1), 300.0
    )


def test_sliced_attention_is_the_same_arithmetic(models_root, tmp_path):
    """--attention sliced writes the UNet's attention one head at a time: same outputs as diffusers'
    attention in PyTorch, and the same image from the exported bundle."""
    from edgediff.runtime import Pipeline

    source = tiny_source("tiny-sd-turbo", models_root)
    rng = np.random.default_rng(0)
    _assert_attention_matches_diffusers(source, "sliced", rng, 500.0)

    bundle = Bundle.open(export_bundle(str(source), tmp_path / "sliced", attention="sliced", progress=False))
    assert bundle.manifest.components["unet"].attributes["attention"] == {"mode": "sliced", "sliced_layers": 8}
    latents = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
    ours = Pipeline(bundle)("a red circle", latents=latents, output_type="np").images
    plain = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root))(
        "a red circle", latents=latents, output_type="np"
    ).images
    assert np.abs(ours - plain).max() <= 1 / 255


def test_the_module_is_released_once_pytorch_has_written_its_graph(monkeypatch, tmp_path):
    """The module's weights must be gone before a large graph's weights are gathered into one file
    (export/tracing.py), whether PyTorch's export succeeded or not; torch.onnx.export and optimum's
    external-data test are restored."""
    import torch
    from optimum.exporters.onnx import convert

    from edgediff.export.tracing import released_after_export

    calls = []
    uses_external = convert.check_model_uses_external_data

    def fake_export(*args, **kwargs):
        calls.append("export")

    def failing_export(*args, **kwargs):
        raise RuntimeError("trace failed")

    for exporter in (fake_export, failing_export):
        monkeypatch.setattr(torch.onnx, "export", exporter)
        calls.clear()
        try:
            with released_after_export(lambda: calls.append("release")):
                torch.onnx.export(None, (), f=None)
        except RuntimeError:
            assert exporter is failing_export
        assert calls == (["export", "release"] if exporter is fake_export else ["release"])
        assert torch.onnx.export is exporter  # restored on leaving the context
        assert convert.check_model_uses_external_data is uses_external


def _graph_with_a_file_per_weight(folder):
    """A small graph saved as PyTorch saves one past 2 GB: each weight (and a Constant's tensor) in a file of its
    own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2, c = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), (8, 3), (3,)))
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "c")),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y0"]),
        helper.make_node("Add", ["y0", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    path = folder / "model.onnx"
    onnx.save_model(
        helper.make_model(graph),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
        convert_attribute=True,
    )
    return path


def test_a_graphs_weights_are_gathered_into_one_file_a_tensor_at_a_time(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgediff.export.tracing import gather_external_data

    path = _graph_with_a_file_per_weight(tmp_path)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    assert len(list(tmp_path.iterdir())) == 4  # the graph and three tensors' files
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    gather_external_data(path, scattered=True)  # a graph the export replaces: its files left as they are
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    gather_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    structure = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in structure.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}
    assert np.array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], before)
    gather_external_data(path)  # gathered already: the same graph again
    assert np.array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], before)


def test_a_whole_graph_past_the_threshold_has_its_weights_moved_beside_it(tmp_path):
    """PyTorch writes a graph under 2 GB whole: past `beside_past` bytes of weights it leaves the tracer with them
    in the one file the bundle takes (the export's later readings then parse its structure alone; tensors under
    onnx's 1 KB threshold stay in it); under it, or without a threshold, it stays whole. The graph computes the
    same."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import uses_external_data

    from edgediff.export.tracing import gather_external_data

    rng = np.random.default_rng(0)
    big, small = rng.standard_normal((256, 8)).astype(np.float32), rng.standard_normal((8, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "big"], ["h"]), helper.make_node("MatMul", ["h", "small"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(big, "big"), numpy_helper.from_array(small, "small")],
    )
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(graph), str(path))  # whole, as PyTorch writes a graph under 2 GB
    weights = big.nbytes + small.nbytes
    x = rng.standard_normal((2, 256)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    for beside_past in (None, weights):  # no threshold, and weights not past it: left whole
        gather_external_data(path, beside_past)
        assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
    gather_external_data(path, weights - 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx_data"]
    structure = onnx.load(str(path), load_external_data=False)
    assert {t.name: uses_external_data(t) for t in structure.graph.initializer} == {"big": True, "small": False}
    assert (tmp_path / "model.onnx_data").stat().st_size == big.nbytes
    assert np.array_equal(ort.InferenceSession(str(path)).run(None, {"x": x})[0], before)


def test_a_gathered_graph_enters_the_bundle_by_moving_its_weights(tmp_path):
    """fp32 graphs past 2 GB: their gathered weights file is moved into the bundle, not loaded and written again;
    a graph whose weights lie in several files, or in the graph, is saved as before."""
    import onnx
    import onnxruntime as ort

    from edgediff.export.bundle_writer import _move_weights
    from edgediff.export.tracing import gather_external_data

    raw, staging = tmp_path / "raw", tmp_path / "staging"
    raw.mkdir(), staging.mkdir()
    path = _graph_with_a_file_per_weight(raw)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    scattered = onnx.load(str(path), load_external_data=False)
    assert _move_weights(scattered, path, staging, "unet") is None  # three files: loaded, for _save_graph
    assert all(t.raw_data for t in scattered.graph.initializer) and not list(staging.iterdir())
    gather_external_data(path)
    files = _move_weights(onnx.load(str(path), load_external_data=False), path, staging, "unet")
    assert sorted(files) == sorted(p.name for p in staging.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    assert not (raw / "model.onnx_data").exists()  # moved, not copied
    assert files["unet.onnx.data"]["size"] == (staging / "unet.onnx.data").stat().st_size
    assert np.array_equal(ort.InferenceSession(str(staging / "unet.onnx")).run(None, {"x": x})[0], before)
    inside = onnx.load(str(staging / "unet.onnx"))  # weights in memory: nothing to move
    assert _move_weights(inside, staging / "unet.onnx", tmp_path, "other") is None


def test_a_replaced_graphs_weights_enter_the_bundle_in_their_own_files(tmp_path, monkeypatch):
    """An fp32 graph the export quantises and replaces keeps PyTorch's files, one a weight: they move into a folder
    of the bundle's own, each named in the manifest with the length of the weight it holds (the quantiser maps a
    weight whose recorded length is its array's); the graph computes the same. Replacing it removes that folder."""
    import onnx
    import onnxruntime as ort
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors

    from edgediff.export import quantize
    from edgediff.export.bundle_quantize import place_one
    from edgediff.export.bundle_writer import _move_weights
    from edgediff.runtime.manifest import ComponentSpec

    raw, staging = tmp_path / "raw", tmp_path / "staging"
    raw.mkdir(), staging.mkdir()
    path = _graph_with_a_file_per_weight(raw)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    before = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    weights = {p.name: p.read_bytes() for p in raw.iterdir() if p != path}
    whole = onnx.load(str(path))  # its weights in it: the quantised graph that replaces it, below
    structure = onnx.load(str(path), load_external_data=False)
    for tensor in _get_all_tensors(structure):  # where a file holds one weight, its location may be all it records
        kept = [e for e in tensor.external_data if e.key == "location"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
    files = _move_weights(structure, path, staging, "unet", False, True)
    moved = {f"unet.onnx.weights/{name}" for name in weights}
    assert set(files) == {"unet.onnx", *moved} and [p.name for p in raw.iterdir()] == ["model.onnx"]
    assert all(files[f]["size"] == len(weights[f.split("/")[1]]) and "sha256" not in files[f] for f in moved)
    written = _get_all_tensors(onnx.load(str(staging / "unet.onnx"), load_external_data=False))
    assert {ExternalDataInfo(t).location: ExternalDataInfo(t).length for t in written} == {
        f"unet.onnx.weights/{name}": len(data) for name, data in weights.items()
    }
    assert np.array_equal(ort.InferenceSession(str(staging / "unet.onnx")).run(None, {"x": x})[0], before)
    # its size counts the files in that folder (the quantisers stream a graph past LARGE_GRAPH_BYTES)
    total = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    for limit, large in ((total - 1, True), (total, False)):
        monkeypatch.setattr(quantize, "LARGE_GRAPH_BYTES", limit)
        assert quantize._large(staging / "unet.onnx") is large
    # replaced by its quantised graph (here: the same graph, its weights in it)
    spec = ComponentSpec(files=files, precision="fp32", inputs=[], outputs=[])
    manifest = type("Manifest", (), {"components": {"unet": spec}})()
    (staging / ".quantized-unet").mkdir()
    onnx.save_model(whole, str(staging / ".quantized-unet" / "unet.onnx"))
    place_one(staging, manifest, "unet", type("Scheme", (), {"precision": "int8"})(), {"scheme": "int8"})
    assert sorted(p.name for p in staging.iterdir()) == ["unet.onnx"] and list(spec.files) == ["unet.onnx"]


@pytest.mark.parametrize("precision", ["int8-static", "int4"])
def test_a_quantised_export_takes_the_weight_files_pytorch_wrote_as_they_are(
    models_root, tmp_path, monkeypatch, precision
):
    """PyTorch writes a graph past 2 GB with a file a weight. The graphs quantisation replaces are checked, recorded,
    ranked and quantised from those files where they lie (the text encoder in its process ahead too): the same
    quantised graphs and records as from gathered weights, and none of those files left in the bundle. Forced here:
    each traced tiny graph is rewritten as PyTorch writes one past 2 GB (its tensors past 1 KB in files of their own);
    int4 quantises every graph of this process as one past 2 GB, a weight at a time."""
    import onnx

    from edgediff.export import ExportOptions, bundle_quantize, export, quantize

    monkeypatch.setattr(quantize, "LARGE_GRAPH_BYTES", 0)
    source, options = str(tiny_source("tiny-sd1", models_root)), ExportOptions(precision=precision, keep="auto")
    gathered = export(source, tmp_path / "gathered", options, progress=False)
    real_export, real_place, replaced = torch.onnx.export, bundle_quantize.place_one, {}

    def as_past_2gb(*args, **kwargs):
        result = real_export(*args, **kwargs)
        path = str(kwargs["f"])  # optimum passes the graph's path
        whole = onnx.load(path)
        onnx.save_model(
            whole,
            path,
            save_as_external_data=True,
            all_tensors_to_one_file=False,
            size_threshold=1024,
            convert_attribute=True,
        )
        return result

    def place_one(staging, manifest, name, *args):
        replaced[name] = list(manifest.components[name].files)  # the fp32 graph's files, as it is replaced
        return real_place(staging, manifest, name, *args)

    monkeypatch.setattr(torch.onnx, "export", as_past_2gb)
    monkeypatch.setattr(bundle_quantize, "place_one", place_one)
    scattered = export(source, tmp_path / "scattered", options, progress=False)
    one, two = Bundle.open(gathered, verify="full").manifest, Bundle.open(scattered, verify="full").manifest
    assert set(replaced) == {n for n, spec in one.components.items() if spec.precision != "fp32"} >= {"unet"}
    for name, files in replaced.items():
        assert len([f for f in files if f.startswith(f"{name}.onnx.weights/")]) > 1, name
        assert two.components[name].attributes["quantization"] == one.components[name].attributes["quantization"]
        assert graph_contents(scattered / f"{name}.onnx") == graph_contents(gathered / f"{name}.onnx"), name
        assert not (scattered / f"{name}.onnx.weights").exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graphs_past_the_threshold_keep_their_weights_beside_them(models_root, tmp_path, monkeypatch, precision):
    """Graphs whose weights pass WEIGHTS_BESIDE_BYTES (the full-size text encoder's 1.4 GB) are written with them in a
    .data file beside the graph, checked and checksummed; the bundle generates the same image as one whose graphs
    hold their weights. Forced here on the tiny model, whose graphs are all smaller: their weights leave the traced
    graph as PyTorch writes it (tracing.gather_external_data), and fp16's conversion reads them from there."""
    from edgediff.runtime import Pipeline

    inside = tiny_bundle("tiny-sd1", models_root, precision=precision)
    monkeypatch.setattr(bundle_writer, "WEIGHTS_BESIDE_BYTES", 0)
    source = str(tiny_source("tiny-sd1", models_root))
    beside = export_bundle(source, tmp_path / "beside", precision=precision, progress=False)
    manifest = Bundle.open(beside, verify="full").manifest
    for name in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        files = manifest.components[name].files
        assert sorted(files) == [f"{name}.onnx", f"{name}.onnx.data"] and all("sha256" in f for f in files.values())
        assert f"{name}.onnx.data" not in Bundle.open(inside).manifest.components[name].files
    images = [
        Pipeline.from_bundle(path)("a cat", seed=0, num_inference_steps=2, output_type="np").images
        for path in (inside, beside)
    ]
    np.testing.assert_array_equal(images[0], images[1])
