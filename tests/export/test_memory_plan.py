"""The export's memory estimate (export/memory_plan.py): weights counted from the files as they will be
loaded, and a model that cannot fit refused before it is loaded, with nothing left at the output."""

import numpy as np
import pytest
from tiny_models import tiny_source

pytest.importorskip("torch")


def test_component_bytes_are_the_loaded_fp32_weights(models_root):
    from diffusers import UNet2DConditionModel

    from edgediff.export.memory_plan import component_bytes

    folder = tiny_source("tiny-sd1", models_root) / "unet"
    unet = UNet2DConditionModel.from_pretrained(folder)
    assert component_bytes(folder) == sum(t.numel() * 4 for t in unet.state_dict().values())


def test_half_precision_files_count_as_fp32(tmp_path):
    from safetensors.numpy import save_file

    from edgediff.export.memory_plan import component_bytes

    save_file({"w": np.zeros((10, 20), np.float16), "step": np.zeros(3, np.int64)}, tmp_path / "model.safetensors")
    assert component_bytes(tmp_path) == 10 * 20 * 4 + 3 * 8


def test_variants_beside_the_weights_are_not_counted(tmp_path):
    """diffusers loads diffusion_pytorch_model.safetensors, not the .non_ema / .fp16 variants beside it."""
    from safetensors.numpy import save_file

    from edgediff.export.memory_plan import component_bytes

    save_file({"w": np.zeros(100, np.float32)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": np.zeros(100, np.float32)}, tmp_path / "diffusion_pytorch_model.non_ema.safetensors")
    save_file({"w": np.zeros(100, np.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert component_bytes(tmp_path) == 400


def test_stages_free_each_component_after_its_export():
    from edgediff.export.memory_plan import BASE_BYTES, EXPORT_COPIES, export_stages

    stages = {s.name: s.bytes for s in export_stages({"unet": 300, "vae": 100}, quantised=False)}
    assert list(stages) == ["loading the source", "vae: export", "unet: export"]  # smallest first
    assert stages["unet: export"] == BASE_BYTES + 300 + int(EXPORT_COPIES * 300)  # the VAE's weights freed
    assert "recording calibration inputs" in {s.name for s in export_stages({"unet": 1}, quantised=True)}


def test_a_graph_past_2gb_holds_its_weights_and_its_largest_tensor_or_its_opened_copies(tmp_path):
    """Past protobuf's 2 GB the export gathers a graph's weights a tensor at a time: its stage holds the weights,
    a tenth for the tracer and the largest tensor (from the safetensors header), not a second copy, or, where that
    is more, the graph opened in onnxruntime."""
    from safetensors.numpy import save_file

    from edgediff.export.memory_plan import (
        BASE_BYTES,
        EXPORT_COPIES,
        LARGE_EXPORT_COPIES,
        LARGE_GRAPH_BYTES,
        OPENED_COPIES,
        Weights,
        component_weights,
        export_stages,
    )

    save_file({"embed": np.zeros((30, 4), np.float16), "w": np.zeros(50, np.float16)}, tmp_path / "m.safetensors")
    assert component_weights(tmp_path) == Weights(stored=170 * 2, fp32=170 * 4, largest=120 * 4, mapped=True)
    large, small = 3 * 2**30, 2**30
    weights = {"gemma": Weights(large, large, 2**31), "t5": Weights(large, large, 2**27), "vae": Weights(small, small)}
    stages = {s.name: s.bytes for s in export_stages(weights, False)}
    assert large > LARGE_GRAPH_BYTES >= small
    assert list(stages)[1:] == ["vae: export", "gemma: export", "t5: export"]
    # a large largest tensor: gathering sets the stage; a small one: the opened graph does
    assert stages["gemma: export"] == BASE_BYTES + 2 * large + int(LARGE_EXPORT_COPIES * large) + 2**31
    assert stages["t5: export"] == BASE_BYTES + large + int((OPENED_COPIES - 1) * large)
    assert stages["vae: export"] == BASE_BYTES + 2 * large + small + int(EXPORT_COPIES * small) + small


def test_a_model_that_cannot_fit_is_refused_before_loading(models_root, tmp_path, monkeypatch):
    from edgediff.export import export_bundle, memory_plan
    from edgediff.runtime.errors import ExportError

    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 1_000_000)
    loaded = []
    monkeypatch.setattr("edgediff.export.source.load_pipeline", lambda *a, **k: loaded.append(1))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"needs about .* GiB at its peak \(\w+: export\).*0\.0 GiB of memory"):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), out, progress=False)
    assert not loaded and not out.exists()
    monkeypatch.setenv(memory_plan.IGNORE_ENV, "1")  # the user's override: the estimate is not checked
    assert memory_plan.check_source(str(tiny_source("tiny-sd1", models_root)))


def test_sd3_advice_names_no_t5_and_no_t5_leaves_it_out(models_root, monkeypatch):
    from edgediff.export import memory_plan
    from edgediff.runtime.errors import ExportError

    source = str(tiny_source("tiny-sd3", models_root))
    with_t5 = {s.name for s in memory_plan.check_source(source)}
    without = {s.name for s in memory_plan.check_source(source, t5=False)}
    assert "text_encoder_3: export" in with_t5 and "text_encoder_3: export" not in without
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 1)
    with pytest.raises(ExportError, match="--no-t5"):
        memory_plan.check_source(source)


def test_half_precision_weights_load_as_stored_and_are_widened_for_their_own_export(models_root, tmp_path):
    """A source stored in bf16 loads in bf16, memory-mapped, and exports the same graphs as the same weights
    stored in fp32: each component is widened to fp32 just before its export."""
    import torch

    from edgediff.export import export_bundle, memory_plan
    from edgediff.export.source import load_pipeline
    from edgediff.runtime import Pipeline

    fp32 = load_pipeline(str(tiny_source("tiny-sd1", models_root)))
    half = tmp_path / "bf16"
    fp32.to(torch.bfloat16).save_pretrained(half)
    widened = tmp_path / "fp32"
    fp32.to(torch.float32).save_pretrained(widened)  # the bf16-rounded values, stored in fp32

    assert memory_plan.stored_dtype(half / "unet") == "BF16" and memory_plan.stored_dtype(widened / "unet") is None
    w = memory_plan.component_weights(half / "unet")
    assert w.stored * 2 == w.fp32 == memory_plan.component_weights(widened / "unet").fp32
    loaded = load_pipeline(str(half), stored_dtype=True)
    assert loaded.unet.dtype == torch.bfloat16 and load_pipeline(str(half)).unet.dtype == torch.float32
    # read as stored, both stay memory-mapped until their own export; converted as they load (to fuse LoRAs in
    # fp32), the half-precision weights are held from the start
    for source in (half, widened):
        loading = memory_plan.check_source(str(source))[0]
        assert loading.name == "loading the source" and loading.bytes == memory_plan.BASE_BYTES
    converted = memory_plan.check_source(str(half), keep_stored=False)[0]
    assert converted.bytes == memory_plan.BASE_BYTES + memory_plan.component_bytes(half / "unet") + sum(
        memory_plan.component_bytes(half / c) for c in ("vae", "text_encoder")
    )

    images = []
    for source in (half, widened):
        bundle = export_bundle(str(source), tmp_path / f"bundle-{source.name}", progress=False)
        with Pipeline.from_bundle(bundle, provider="cpu") as pipe:
            images.append(pipe("a cat", seed=0, num_inference_steps=2, output_type="np").images)
    np.testing.assert_array_equal(images[0], images[1])


def test_stages_hold_other_components_as_stored_and_this_one_in_fp32():
    from edgediff.export.memory_plan import BASE_BYTES, EXPORT_COPIES, Weights, export_stages

    stages = {s.name: s.bytes for s in export_stages({"unet": Weights(150, 300), "vae": Weights(50, 100)}, False)}
    assert stages["loading the source"] == BASE_BYTES + 200
    # the UNet still in bf16; the VAE's two graphs traced from copies of it
    assert stages["vae: export"] == BASE_BYTES + 150 + int((1 + EXPORT_COPIES) * 100) + 100
    assert stages["unet: export"] == BASE_BYTES + int((1 + EXPORT_COPIES) * 300)


def test_memory_mapped_components_hold_nothing_until_their_own_export():
    """Safetensors read in their stored dtype stay memory-mapped: loading them costs only pages the system can
    take back, so a component is counted from its own export on."""
    from edgediff.export.memory_plan import BASE_BYTES, EXPORT_COPIES, Weights, export_stages

    weights = {"unet": Weights(150, 300, mapped=True), "text_encoder": Weights(50, 100, mapped=True)}
    stages = {s.name: s.bytes for s in export_stages(weights, False)}
    assert stages["loading the source"] == BASE_BYTES
    assert stages["text_encoder: export"] == BASE_BYTES + int((1 + EXPORT_COPIES) * 100)


def test_controlnets_count_as_components_of_their_own(models_root):
    from edgediff.export import memory_plan

    source = tiny_source("tiny-sd1", models_root)
    plain = {s.name: s.bytes for s in memory_plan.check_source(str(source))}
    # any diffusers model folder stands in for a ControlNet's: its weights are what is counted
    with_net = {s.name: s.bytes for s in memory_plan.check_source(str(source), controlnets=[str(source / "unet")])}
    assert "controlnet 1: export" in with_net and "controlnet 1: export" not in plain
    assert with_net["controlnet 1: export"] == plain["unet: export"]  # the same weights, exported the same way
    assert memory_plan.check_source(str(source), controlnets=["some/hub-id"]) is not None  # not on disk: not counted


def test_lora_slots_are_a_stage_of_their_own_that_scales_with_the_slotted_weights():
    from edgediff.export.memory_plan import BASE_BYTES, LORA_SLOT_COPIES, Weights, export_stages

    weights = {"unet": Weights(1_700_000_000, 3_400_000_000), "text_encoder": Weights(250_000_000, 500_000_000)}
    weights["vae"] = Weights(170_000_000, 340_000_000)
    plain = {s.name: s.bytes for s in export_stages(weights, False)}
    slotted = {s.name: s.bytes for s in export_stages(weights, False, slotted=("unet", "text_encoder"))}
    assert list(slotted) == [
        "loading the source",
        "vae: export",
        "text_encoder: export",
        "text_encoder: LoRA slots",  # right after its own export, the UNet still held as stored
        "unet: export",
        "unet: LoRA slots",
    ]
    assert slotted["text_encoder: LoRA slots"] == BASE_BYTES + 1_700_000_000 + int(LORA_SLOT_COPIES * 500_000_000)
    assert slotted["unet: LoRA slots"] == BASE_BYTES + int(LORA_SLOT_COPIES * 3_400_000_000)
    assert {k: v for k, v in slotted.items() if "LoRA" not in k} == plain  # the other stages are unchanged
    # the slotted UNet's graph is the export's peak, above the plain export's
    assert max(slotted.values()) == slotted["unet: LoRA slots"] > max(plain.values())
    doubled = {s.name: s.bytes for s in export_stages({"unet": Weights(1, 6_800_000_000)}, False, ("unet",))}
    assert doubled["unet: LoRA slots"] - BASE_BYTES == pytest.approx(2 * (slotted["unet: LoRA slots"] - BASE_BYTES))


def test_an_export_with_lora_slots_is_refused_naming_their_stage(models_root, tmp_path, monkeypatch):
    """Memory for the plain export but not for slotting: --lora-slots is refused before loading, its stage named."""
    import re

    from edgediff.export import ExportOptions, export, memory_plan
    from edgediff.runtime.errors import ExportError

    monkeypatch.delenv(memory_plan.IGNORE_ENV, raising=False)
    # a full-size UNet (past 2 GB) costs less to export than to slot; a tiny one more, under the small-graph factor
    monkeypatch.setattr(memory_plan, "EXPORT_COPIES", memory_plan.OPENED_COPIES - 1)
    source = str(tiny_source("tiny-sd1", models_root))
    plain = memory_plan.check_source(source)
    slotted = memory_plan.check_source(source, lora_slots="attention")
    assert {s.name for s in slotted} - {s.name for s in plain} == {"unet: LoRA slots", "text_encoder: LoRA slots"}
    worst = max(slotted, key=lambda s: s.bytes)
    assert worst.name.endswith(": LoRA slots") and worst.bytes > max(s.bytes for s in plain)

    monkeypatch.setattr(memory_plan, "available_bytes", lambda: max(s.bytes for s in plain))
    assert memory_plan.check_source(source) == plain  # the plain export fits
    loaded = []
    monkeypatch.setattr("edgediff.export.source.load_pipeline", lambda *a, **k: loaded.append(1))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=rf"needs about .* GiB at its peak \({re.escape(worst.name)}\)"):
        export(source, out, ExportOptions(lora_slots="attention"), progress=False)
    assert not loaded and not out.exists()


def test_recording_opens_one_graph_at_a_time_only_where_they_do_not_fit_together():
    from edgediff.export.memory_plan import BASE_BYTES, RECORDING_COPIES, export_stages, record_one_at_a_time

    weights = {"gemma": 10 * 2**30, "transformer": 2 * 2**30, "vae": 2**30}
    together = BASE_BYTES + int(RECORDING_COPIES * 13 * 2**30)
    alone = BASE_BYTES + int(RECORDING_COPIES * 10 * 2**30)
    assert not record_one_at_a_time(list(weights.values()), together) and not record_one_at_a_time([1], None)
    assert record_one_at_a_time(list(weights.values()), together - 1)

    def recording(free):
        return next(s for s in export_stages(weights, quantised=True, free=free) if s.name.startswith("recording"))

    roomy, tight = recording(together), recording(together - 1)
    assert (roomy.name, roomy.bytes) == ("recording calibration inputs", together)
    assert (tight.name, tight.bytes) == ("recording calibration inputs, one graph at a time", alone)


def test_quantising_a_graph_holds_about_twice_its_weights_and_vae_graphs_stay_fp32():
    from edgediff.export.memory_plan import BASE_BYTES, QUANTIZE_COPIES, export_stages

    weights = {"text_encoder": 10 * 2**30, "transformer": 2 * 2**30, "vae": 2**30}
    stages = {s.name: s.bytes for s in export_stages(weights, quantised=True)}
    assert stages["text_encoder: quantize"] == BASE_BYTES + int(QUANTIZE_COPIES * 10 * 2**30)
    assert "transformer: quantize" in stages and "vae: quantize" not in stages
    assert not any(name.endswith("quantize") for name in (s.name for s in export_stages(weights, quantised=False)))


def test_int4_past_2gb_and_int8_at_any_size_quantise_a_weight_at_a_time():
    from edgediff.export.memory_plan import (
        BASE_BYTES,
        QUANTIZE_COPIES,
        STREAMED_INT8_QUANTIZE_COPIES,
        STREAMED_QUANTIZE_COPIES,
        Weights,
        export_stages,
    )

    large, small = 10 * 2**30, 2**30
    weights = {"text_encoder": Weights(large, large, 2**31), "transformer": Weights(small, small, 2**24)}
    int4 = {s.name: s.bytes for s in export_stages(weights, quantised="int4")}
    int8 = {s.name: s.bytes for s in export_stages(weights, quantised="int8")}
    assert int4["text_encoder: quantize"] == BASE_BYTES + int(STREAMED_QUANTIZE_COPIES * large) + 2**31
    assert int8["text_encoder: quantize"] == BASE_BYTES + int(STREAMED_INT8_QUANTIZE_COPIES * large) + 2**31
    assert int8["text_encoder: quantize"] < BASE_BYTES + int(QUANTIZE_COPIES * large)
    # below 2 GB onnxruntime's 4-bit quantiser holds the whole graph; dynamic int8 streams at any size
    assert int4["transformer: quantize"] == BASE_BYTES + int(QUANTIZE_COPIES * small)
    assert int8["transformer: quantize"] == BASE_BYTES + int(STREAMED_INT8_QUANTIZE_COPIES * small) + 2**24


def test_graphs_are_quantised_side_by_side_only_where_the_two_largest_fit_together():
    from edgediff.export.memory_plan import BASE_BYTES, quantise_side_by_side, quantising_bytes

    graphs = {
        "unet": (4 * 2**30, "int8-static"),
        "text_encoder": (2**30, "int8-dynamic"),
        "tiny": (2**20, "int8-static"),
    }
    both = BASE_BYTES + quantising_bytes(4 * 2**30, "int8-static") + quantising_bytes(2**30, "int8-dynamic")
    assert quantise_side_by_side(graphs, both)
    assert not quantise_side_by_side(graphs, both - 1)
    assert not quantise_side_by_side(graphs, None)  # memory unknown: one at a time
    assert not quantise_side_by_side({"unet": graphs["unet"]}, 2**40)  # nothing to put beside it
    # the graphs' largest tensors, read from their structures, count less than the unknown's worst case (the graph)
    known = {"unet": (4 * 2**30, "int8-static", 2**27), "text_encoder": (2**30, "int8-dynamic", 2**28)}
    assert quantise_side_by_side(known, both - 1)


def test_static_int8_quantises_a_weight_at_a_time_at_any_size():
    """Its stage holds the fp32 graph open for the sensitivity pass and the quantised one beside it, not onnxruntime's
    whole-graph quantiser's copies."""
    from edgediff.export.memory_plan import BASE_BYTES, QUANTIZE_COPIES, STATIC_INT8_COPIES, Weights, export_stages

    for size in (2**28, 3 * 2**30):  # under and past protobuf's 2 GB
        weights = {"unet": Weights(size, size, 2**24)}
        stages = {s.name: s.bytes for s in export_stages(weights, quantised="int8-static")}
        assert stages["unet: quantize"] == BASE_BYTES + int(STATIC_INT8_COPIES * size) + 2**24
        assert stages["unet: quantize"] < BASE_BYTES + int(QUANTIZE_COPIES * size)


def test_graph_largest_reads_the_largest_initializer_from_the_structure(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from edgediff.export.memory_plan import graph_largest

    w = numpy_helper.from_array(np.zeros((8, 16), np.float32), "w")
    ids = numpy_helper.from_array(np.zeros((100, 2), np.int64), "ids")  # the largest: 1600 bytes
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
        [w, ids],
    )
    onnx.save_model(helper.make_model(graph), str(tmp_path / "g.onnx"), save_as_external_data=True, size_threshold=0)
    assert graph_largest(tmp_path / "g.onnx") == 100 * 2 * 8


def test_text_encoders_go_ahead_only_where_their_process_fits_beside_the_largest_export_left():
    from edgediff.export.memory_plan import (
        BASE_BYTES,
        LORA_SLOT_COPIES,
        Weights,
        quantise_ahead,
        quantising_bytes,
        recording_bytes,
    )

    graphs = {"text_encoder": (2**30, "int8-dynamic", 2**27), "text_encoder_2": (2**28, "int8-dynamic", 2**26)}
    unet, tiny = Weights(3 * 2**30, 3 * 2**30, 2**26), Weights(2**20, 2**20)
    left = {"vae_decoder_tiny": tiny, "unet": unet}
    exporting = unet.fp32 + unet.export_extra()
    both = BASE_BYTES + quantising_bytes(*graphs["text_encoder"]) + exporting  # its largest quantisation
    assert quantise_ahead(graphs, left, both)
    assert not quantise_ahead(graphs, left, both - 1)
    assert not quantise_ahead(graphs, {"unet": unet}, None)  # memory unknown: after the recording
    assert not quantise_ahead(graphs, {}, 2**40)  # no export left to run beside
    # the UNet slotted for run-time LoRAs: its slotting holds more than its export
    slotted = BASE_BYTES + quantising_bytes(*graphs["text_encoder"]) + int(LORA_SLOT_COPIES * unet.fp32)
    assert not quantise_ahead(graphs, left, both, slotted=("unet",)) and quantise_ahead(
        graphs, left, slotted, ("unet",)
    )
    # int4 weights past 2 GB quantise a weight at a time: recording both encoders' graphs together holds more
    big = {"text_encoder": (2**29, "int4-weight-only"), "text_encoder_2": (3 * 2**30, "int4-weight-only", 2**27)}
    recording = recording_bytes([2**29, 3 * 2**30], one_at_a_time=False)
    assert recording > BASE_BYTES + max(quantising_bytes(*g) for g in big.values())
    assert quantise_ahead(big, left, recording + exporting) and not quantise_ahead(big, left, recording + exporting - 1)
