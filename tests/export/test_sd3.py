"""SD3 family: MMDiT transformer, CLIP-L + CLIP-G with pooled text, optional T5, 16-channel VAE with a shift,
flow-matching Euler; against diffusers' StableDiffusion3Pipeline on a tiny random model (with T5 and without)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS  # noqa: E402
from tiny_models import tiny_autoencoder_tiny, tiny_sd3_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402

TINY_DECODER_ATOL = 1e-4  # the tiny decoder's fp32 graph against PyTorch, pixels in [0, 1]


def _reference(source, manifest, t5: bool, latents, **call):
    """diffusers' images from the same folder (T5 left out as the bundle was), with the bundle's scheduler config."""
    without_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(str(source), **without_t5)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    return pipe(latents=torch.from_numpy(latents), output_type="np", **call).images


CASES = [
    # t5, steps, guidance, negative prompts, (height, width), images per prompt, max_sequence_length
    (True, 2, 5.0, None, (64, 64), 1, None),  # CFG: "" through all three encoders as the unconditional input
    (True, 1, 0.0, None, (64, 64), 1, None),  # no CFG (the turbo setting)
    (True, 1, 4.5, ["blurry", "dark"], (48, 64), 2, 32),  # non-square, negatives, a batch per prompt, short T5
    (False, 2, 5.0, None, (64, 64), 1, None),  # --no-t5: zeros in T5's place, as diffusers without text_encoder_3
    (False, 1, 0.0, None, (64, 32), 1, None),
    (False, 1, 3.0, None, (64, 64), 1, 32),  # --no-t5 with fewer zero tokens: the count follows the call
]


@pytest.mark.parametrize(
    "t5,steps,guidance,negative,size,per_prompt,max_sequence_length",
    CASES,
    ids=[f"{'t5' if c[0] else 'no-t5'}-{c[1]}-cfg{c[2]:g}-{c[4][0]}x{c[4][1]}" for c in CASES],
)
def test_sd3_matches_diffusers(models_root, t5, steps, guidance, negative, size, per_prompt, max_sequence_length):
    pipe = Pipeline.from_bundle(tiny_sd3_bundle(models_root, t5), provider="cpu")
    m = pipe.manifest
    height, width = size
    shape = (len(PROMPTS) * per_prompt, 16, height // m.vae_scale_factor, width // m.vae_scale_factor)
    latents = np.random.default_rng(steps).standard_normal(shape).astype(np.float32)
    call = dict(
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
    )
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call, **length).images
    theirs = _reference(tiny_source("tiny-sd3", models_root), m, t5, latents, prompt=PROMPTS, **call, **length)
    assert ours.shape == theirs.shape == (shape[0], height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts and latents: different images


def test_sd3_manifest_records_what_the_runtime_needs(models_root):
    bundle = Bundle.open(tiny_sd3_bundle(models_root))
    m = bundle.manifest
    assert (m.family, m.prediction_type, m.latent_channels, m.denoiser) == (
        "sd3.5",  # the tiny transformer has SD3.5's QK-normalisation
        "flow_prediction",
        16,
        "transformer",
    )
    assert m.scheduler["name"] == "flow_euler" and m.scheduler["config"]["shift"] == 3.0  # the model's own shift
    assert (m.defaults["steps"], m.defaults["guidance"]) == (28, 4.5)
    assert (m.vae_scaling_factor, m.vae_shift_factor) == (1.5305, 0.0609)
    c = m.conditioning
    assert (c["t5"], c["max_sequence_length"], c["joint_attention_dim"]) == (True, 256, 96)
    clip_l, clip_g, t5 = c["encoders"]
    # the penultimate hidden state of each CLIP (2 and 3 layers) and both pooled outputs
    assert (clip_l["output"], clip_g["output"]) == ("hidden_states.1", "hidden_states.2")
    assert clip_l["pooled"] == clip_g["pooled"] == "text_embeds" and "pooled" not in t5
    assert (t5["component"], t5["tokenizer"]["file"], t5["tokenizer"]["max_length"]) == (
        "text_encoder_3",
        "tokenizer_3.json",
        256,
    )
    transformer = m.components["transformer"]
    assert transformer.attributes["patch_size"] == 2
    # each feed-forward's tanh GELU (image and text streams; the last block has no text one) is one FastGelu
    config = diffusers.SD3Transformer2DModel.load_config(str(tiny_source("tiny-sd3", models_root) / "transformer"))
    assert transformer.attributes["rewrites"]["fast_gelu"] == 2 * config["num_layers"] - 1
    # in topological order, as ONNX wants it: the fusion appends its nodes, and a walk back from the outputs (the
    # quantisers' pruning, kept_fp32.py) dropped them
    import onnx

    graph = onnx.load(str(bundle.path / "transformer.onnx"), load_external_data=False).graph
    made = {t.name for t in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        assert all(not t or t in made for t in node.input), node.name
        made.update(node.output)
    inputs = {t.name: t.shape for t in transformer.inputs}
    assert inputs["hidden_states"][1] == 16 and inputs["pooled_projections"][1] == 32 + 24
    assert inputs["encoder_hidden_states"][2] == 96

    without = Bundle.open(tiny_sd3_bundle(models_root, t5=False))
    assert "text_encoder_3" not in without.manifest.components
    assert without.manifest.conditioning["t5"] is False and len(without.manifest.conditioning["encoders"]) == 2
    assert not (without.path / "tokenizer_3.json").exists()
    assert json.loads((without.path / "manifest.json").read_text())["provenance"]["source"]


def test_sd3_without_t5_takes_its_zero_tokens_as_one_counted(models_root, tmp_path):
    """A --no-t5 bundle's transformer takes the CLIP tokens and one zero token standing for T5's 256: the graph gives
    what it gives on the whole zero sequence, and with fused attention (the counts in a channel added to queries
    and keys) the bundle draws what diffusers draws."""
    import onnx
    import onnxruntime as ort

    from edgediff.export import ExportOptions, export
    from edgediff.runtime.denoisers.sd3 import TEXT_LOG_COUNTS, text_log_counts

    bundle = Bundle.open(tiny_sd3_bundle(models_root, t5=False))
    transformer = bundle.manifest.components["transformer"]
    assert transformer.attributes["counted_text"] is True
    assert TEXT_LOG_COUNTS in {t.name for t in transformer.inputs}
    session = ort.InferenceSession(str(bundle.component_path("transformer")), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    clip = rng.standard_normal((2, 16, 96)).astype(np.float32)  # the tiny CLIPs' 16 tokens, padded to T5's width
    common = {
        "hidden_states": rng.standard_normal((2, 16, 8, 8)).astype(np.float32),
        "pooled_projections": rng.standard_normal((2, 56)).astype(np.float32),
        "timestep": np.array([500.0, 800.0], dtype=np.float32),
    }
    whole = np.concatenate([clip, np.zeros((2, 256, 96), np.float32)], axis=1)
    expected = session.run(None, {**common, "encoder_hidden_states": whole, TEXT_LOG_COUNTS: np.zeros((2, 272), "f")})
    counted = np.concatenate([clip, np.zeros((2, 1, 96), np.float32)], axis=1)
    ours = session.run(None, {**common, "encoder_hidden_states": counted, TEXT_LOG_COUNTS: text_log_counts(2, 17, 256)})
    assert np.abs(ours[0] - expected[0]).max() <= 1e-4 * max(1.0, np.abs(expected[0]).max())

    source = tiny_source("tiny-sd3", models_root)
    fused = Bundle.open(export(str(source), tmp_path / "fused", ExportOptions(t5=False, attention="fused"), False))
    graph = onnx.load(str(fused.component_path("transformer")), load_external_data=False)
    config = diffusers.SD3Transformer2DModel.load_config(str(source / "transformer"))
    attention = fused.manifest.components["transformer"].attributes["attention"]
    # every joint attention and SD3.5's image-only second ones fused: the counts ride in the keys, not in a mask
    assert attention["fused_layers"] == config["num_layers"] + len(config["dual_attention_layers"])
    assert "Softmax" not in {n.op_type for n in graph.graph.node}
    latents = np.random.default_rng(5).standard_normal((len(PROMPTS), 16, 8, 8)).astype(np.float32)
    call = dict(num_inference_steps=2, guidance_scale=4.0, height=64, width=64)
    images = Pipeline(fused, provider="cpu")(PROMPTS, latents=latents, output_type="np", **call).images
    theirs = _reference(source, fused.manifest, False, latents, prompt=PROMPTS, **call)
    assert np.abs(images - theirs).max() <= PIXEL_ATOL


def test_sd3_families_are_detected_from_configs(models_root):
    from edgediff.export.families import detect_family
    from edgediff.export.source import load_pipeline, source_facts

    facts = source_facts(load_pipeline(str(tiny_source("tiny-sd3", models_root)), t5=False), "my/sd3")
    assert facts.transformer_class == "SD3Transformer2DModel" and facts.text_encoders == 2
    assert detect_family(facts).name == "sd3.5"
    sd3_medium = facts.__class__(**{**facts.__dict__, "qk_norm": None})
    assert detect_family(sd3_medium).name == "sd3" and detect_family(sd3_medium).default_guidance == 7.0
    turbo = detect_family(facts.__class__(**{**facts.__dict__, "name": "stabilityai/stable-diffusion-3.5-large-turbo"}))
    assert (turbo.name, turbo.sampler, turbo.default_steps, turbo.default_guidance) == (
        "sd3.5-turbo",
        "flow_euler",
        4,
        0,
    )


def test_sd3_sizes_must_be_multiples_of_16(models_root):
    pipe = Pipeline.from_bundle(tiny_sd3_bundle(models_root, t5=False), provider="cpu")
    with pytest.raises(InputError, match=r"width must be a multiple of 16 .*got 56; nearest valid: 48 or 64"):
        pipe("a red circle", width=56, num_inference_steps=1)
    with pytest.raises(InputError, match=r"height must be a multiple of 16 .*got 8; nearest valid: 16$"):
        pipe("a red circle", height=8, num_inference_steps=1)
    with pytest.raises(InputError, match="height must be a positive multiple of 16, got 0"):
        pipe("a red circle", height=0, num_inference_steps=1)
    with pytest.raises(InputError, match="max_sequence_length must be between 1 and 512"):
        pipe("a red circle", max_sequence_length=600, num_inference_steps=1)
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(InputError, match=r"mask_image= \(inpainting, outpainting\) is not available for sd3.5 bundles"):
        pipe("a red circle", image=image, mask_image=image[..., 0], num_inference_steps=1)


def test_no_t5_option_and_refusals(models_root, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli.main import cli
    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    assert ExportOptions().t5 and not ExportOptions.from_cli(t5=False).t5
    with pytest.raises(ExportOptionsError, match="--no-t5 apply to --target onnx"):
        ExportOptions(target="coreml", t5=False)
    assert "--no-t5" in CliRunner().invoke(cli, ["export", "--help"]).output
    with pytest.raises(ExportOptionsError, match="--attention sliced is not available for sd3.5 models"):
        export(str(tiny_source("tiny-sd3", models_root)), tmp_path / "b", ExportOptions(attention="sliced"), False)
    assert not (tmp_path / "b").exists()


def test_sd3_tiny_decoder_draws_what_diffusers_draws_with_it(models_root, tmp_path):
    """A TAESD3-style decoder (16 channels) beside SD3's VAE takes the pipeline's latents as they are (its own
    scaling 1, no shift), as StableDiffusion3Pipeline with vae=AutoencoderTiny decodes them; the full VAE keeps
    SD3's scaling and shift."""
    from edgediff.export import ExportOptions, export

    tiny = tiny_autoencoder_tiny(models_root, latent_channels=16)
    source = tiny_source("tiny-sd3", models_root)
    options = ExportOptions(t5=False, tiny_decoder=str(tiny))
    pipe = Pipeline.from_bundle(export(str(source), tmp_path / "sd3-tiny", options, progress=False), provider="cpu")
    assert pipe.decoders == ["full", "tiny"]
    latents = np.random.default_rng(3).standard_normal((1, 16, 8, 8)).astype(np.float32)
    call = dict(num_inference_steps=1, guidance_scale=0.0, height=64, width=64)
    ours = pipe(PROMPTS[0], latents=latents, output_type="np", decoder="tiny", **call).images

    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(
        str(source), text_encoder_3=None, tokenizer_3=None, vae=diffusers.AutoencoderTiny.from_pretrained(str(tiny))
    )
    reference.vae.register_to_config(shift_factor=0.0)  # as TAESD3's model card sets it
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(pipe.manifest.scheduler["config"])
    theirs = reference(PROMPTS[0], latents=torch.from_numpy(latents), output_type="np", **call).images
    assert ours.shape == theirs.shape == (1, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    full = pipe(PROMPTS[0], latents=latents, output_type="np", decoder="full", **call).images
    assert np.abs(full - ours).max() > PIXEL_ATOL  # the two decoders are different models
    # closer than the pipelines' tolerance: the decoder alone against PyTorch, on the latents the pipeline returns
    returned = pipe(PROMPTS[0], latents=latents, output_type="latent", **call).images
    with torch.no_grad():
        pixels = reference.vae.decode(torch.from_numpy(returned)).sample
    expected = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(
        pipe.decode(returned, decoder="tiny", output_type="np"), expected, atol=TINY_DECODER_ATOL
    )


STANDARD_OPS_ATOL = 1e-5  # FastGelu against the same tanh GELU as separate operators, pixels in [0, 1]


def test_standard_ops_keeps_every_graph_to_onnx_operators(models_root, tmp_path, caplog):
    """`--standard-ops`: no graph holds onnxruntime's own operators (OpenVINO would run it in pieces, which
    onnxruntime-openvino 1.24 fails at run time); the image is the fused bundle's. Opening the fused bundle on
    OpenVINO says so; the options that write such operators are refused with it."""
    import onnx

    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    fused = Bundle.open(tiny_sd3_bundle(models_root, t5=False))
    plain = Bundle.open(
        export(
            str(tiny_source("tiny-sd3", models_root)),
            tmp_path / "standard",
            ExportOptions(t5=False, standard_ops=True),
            progress=False,
        )
    )
    assert fused.manifest.components["transformer"].attributes["rewrites"]["fast_gelu"] > 0
    for name, spec in plain.manifest.components.items():
        graph = onnx.load(str(plain.path / spec.graph_file), load_external_data=False).graph
        assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, name
        assert "fast_gelu" not in spec.attributes.get("rewrites", {})
    call = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64, output_type="np")
    latents = np.random.default_rng(0).standard_normal((1, 16, 8, 8)).astype(np.float32)
    images = [Pipeline(b)("a cat", latents=latents, **call).images for b in (fused, plain)]
    assert np.abs(images[0] - images[1]).max() <= STANDARD_OPS_ATOL

    # opened on OpenVINO (here onnxruntime's CPU build standing in: it runs the graphs on its CPU provider), the fused
    # bundle is named with the export that suits it, the standard-ops one is not
    import logging

    from edgediff.runtime import providers as prov

    with pytest.MonkeyPatch.context() as mp, caplog.at_level(logging.WARNING, logger="edgediff.pipeline"):
        mp.setattr(prov.ort, "get_available_providers", lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
        mp.setattr(prov, "openvino_devices", lambda: ["CPU"])
        Pipeline(fused, provider="openvino", cache=False).close()
        assert "transformer holds onnxruntime's own operators (FastGelu)" in caplog.text
        assert "export with --standard-ops" in caplog.text
        caplog.clear()
        Pipeline(plain, provider="openvino", cache=False).close()
        Pipeline(fused, provider="cpu", cache=False).close()
    assert "onnxruntime's own operators" not in caplog.text

    for refused, why in (
        ({"attention": "fused"}, "MultiHeadAttention"),
        ({"optimize": "cpu"}, "fused operators"),
        ({"precision": "int4"}, "MatMulNBits"),
    ):
        with pytest.raises(ExportOptionsError, match=f"--standard-ops keeps to ONNX's standard operators, .*{why}"):
            ExportOptions(standard_ops=True, **refused)
    with pytest.raises(ExportOptionsError, match="--standard-ops"):
        ExportOptions(target="coreml", standard_ops=True)
