"""SANA and SANA-Sprint: the linear-attention DiT over 32x DC-AE latents, Gemma-2 text with the complex-human-
instruction prefix and its attention mask, SANA's flow DPM-Solver++ with CFG and Sprint's SCM with embedded guidance;
against diffusers' SanaPipeline / SanaSprintPipeline on tiny random models from the same latents (and, for SCM's
re-noising, the same step noise); Sprint's image-to-image against SanaSprintImg2ImgPipeline through the DC-AE encoder."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS, gradient_image  # noqa: E402
from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402
from edgediff.runtime.denoisers.base import flow_start_index  # noqa: E402
from edgediff.runtime.tokenizer import PromptTokenizer  # noqa: E402

VARIANTS = {"sana": "tiny-sana", "sprint": "tiny-sana-sprint"}
LATENT_CHANNELS, DC_AE_FACTOR = 8, 32  # the tiny models' (models/random_init.py)


def _pipeline(models_root, variant: str) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle(VARIANTS[variant], models_root), provider="cpu")


def _reference(models_root, variant, latents, **call):
    """diffusers' images from the same folder; no resolution binning (our runtime generates at the size asked)."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tiny_source(VARIANTS[variant], models_root)))
    pipe.set_progress_bar_config(disable=True)
    return pipe(latents=torch.from_numpy(latents), output_type="np", use_resolution_binning=False, **call).images


def _latents(batch, height, width, seed):
    shape = (batch, LATENT_CHANNELS, height // DC_AE_FACTOR, width // DC_AE_FACTOR)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


SANA_CASES = [
    # steps, guidance, (height, width), images per prompt, max_sequence_length, negative prompt
    (2, 4.5, (128, 96), 1, None, None),  # CFG with the default "" negative, SANA's 300 tokens, non-square
    (1, 1.0, (64, 128), 2, 32, None),  # no CFG, a batch per prompt, a short text
    (2, 3.0, (96, 96), 1, 48, "blurry, low quality"),  # a negative prompt (no instruction prefix before it)
]


@pytest.mark.parametrize(
    "steps,guidance,size,per_prompt,length,negative",
    SANA_CASES,
    ids=[f"{c[0]}-g{c[1]:g}-{c[2][0]}x{c[2][1]}-x{c[3]}-len{c[4]}-{'neg' if c[5] else 'noneg'}" for c in SANA_CASES],
)
def test_sana_matches_diffusers(models_root, steps, guidance, size, per_prompt, length, negative):
    pipe = _pipeline(models_root, "sana")
    height, width = size
    batch = len(PROMPTS) * per_prompt
    latents = _latents(batch, height, width, steps)
    call = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        max_sequence_length=length or pipe.manifest.conditioning["max_sequence_length"],
    )
    ours = pipe(PROMPTS, negative_prompt=negative, latents=latents, output_type="np", **call).images
    theirs = _reference(models_root, "sana", latents, prompt=PROMPTS, negative_prompt=negative or "", **call)
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts and latents: different images


SPRINT_CASES = [
    # steps, guidance, (height, width), images per prompt, max_sequence_length
    (2, 4.5, (128, 96), 1, None),  # Sprint's default: two steps through the intermediate angle 1.3
    (1, 3.0, (64, 64), 2, 32),
    (4, 4.5, (96, 128), 1, 64),
]


@pytest.mark.parametrize(
    "steps,guidance,size,per_prompt,length",
    SPRINT_CASES,
    ids=[f"{c[0]}-g{c[1]:g}-{c[2][0]}x{c[2][1]}-x{c[3]}-len{c[4]}" for c in SPRINT_CASES],
)
def test_sana_sprint_matches_diffusers(models_root, monkeypatch, steps, guidance, size, per_prompt, length):
    pipe = _pipeline(models_root, "sprint")
    height, width = size
    batch = len(PROMPTS) * per_prompt
    latents = _latents(batch, height, width, steps)
    # SCM re-noises its estimate at every step: both draw the same arrays
    noises = [np.random.default_rng(100 + i).standard_normal(latents.shape).astype(np.float32) for i in range(steps)]
    call = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        max_sequence_length=length or pipe.manifest.conditioning["max_sequence_length"],
    )
    ours = pipe(PROMPTS, latents=latents, generator=ReplayNoise(noises), output_type="np", **call).images
    patch_diffusers_noise(monkeypatch, diffusers.schedulers.scheduling_scm, noises)
    # SanaSprintPipeline's intermediate angle applies to two steps only (our sampler's "auto")
    intermediate = {} if steps == 2 else {"intermediate_timesteps": None}
    theirs = _reference(models_root, "sprint", latents, prompt=PROMPTS, **call, **intermediate)
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL


IMG2IMG_CASES = [
    # steps, strength, (height, width), images per prompt
    (2, 0.5, (64, 64), 1),  # one step, from the intermediate angle 1.3
    (4, 0.6, (96, 128), 2),  # 3 of 4 steps, non-square, a batch per prompt from one image
]


@pytest.mark.parametrize(
    "steps,strength,size,per_prompt",
    IMG2IMG_CASES,
    ids=[f"{c[0]}-s{c[1]:g}-{c[2][0]}x{c[2][1]}-x{c[3]}" for c in IMG2IMG_CASES],
)
def test_sana_sprint_img2img_matches_diffusers(models_root, monkeypatch, steps, strength, size, per_prompt):
    import diffusers.pipelines.sana.pipeline_sana_sprint_img2img as img2img_module

    pipe = _pipeline(models_root, "sprint")
    height, width = size
    batch = len(PROMPTS) * per_prompt
    # 8-bit pixels, so that both sides see the same values (our runtime reads images as 8-bit)
    image = (gradient_image(max(size))[:height, :width] * 255).round().astype(np.uint8)
    shape = (batch, LATENT_CHANNELS, height // DC_AE_FACTOR, width // DC_AE_FACTOR)
    rng = np.random.default_rng(steps)
    runs = steps - flow_start_index(steps, strength)
    # the start noise, then SCM's re-noising at every step run (DC-AE's encoder draws no sample)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(1 + runs)]
    call = dict(
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=4.5,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        max_sequence_length=pipe.manifest.conditioning["max_sequence_length"],
    )
    seen = []
    ours = pipe(
        PROMPTS, image=image, generator=ReplayNoise(noises), callback=seen.append, output_type="np", **call
    ).images

    reference = diffusers.SanaSprintImg2ImgPipeline.from_pretrained(str(tiny_source(VARIANTS["sprint"], models_root)))
    reference.set_progress_bar_config(disable=True)
    patch_diffusers_noise(monkeypatch, img2img_module, noises, diffusers.schedulers.scheduling_scm)
    image_t = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)  # [0, 1], at size
    intermediate = {} if steps == 2 else {"intermediate_timesteps": None}
    theirs = reference(
        PROMPTS, image=image_t, output_type="np", use_resolution_binning=False, **call, **intermediate
    ).images
    assert len(seen) == runs
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    plain = pipe(PROMPTS, seed=0, output_type="np", **call | {"strength": None}).images
    assert np.abs(ours - plain).max() > PIXEL_ATOL  # the image really steered the result


def test_sana_sprint_guidance_is_embedded(models_root):
    pipe = _pipeline(models_root, "sprint")
    latents = _latents(1, 64, 64, 0)
    call = dict(latents=latents, num_inference_steps=1, height=64, width=64, output_type="np", seed=1)
    a, b = (pipe("a red circle", guidance_scale=g, **call).images for g in (1.0, 7.0))
    assert np.abs(a - b).max() > PIXEL_ATOL  # guidance changes the image without an unconditional batch


def test_sana_manifests_record_what_the_runtime_needs(models_root):
    for variant, family, sampler, prediction, steps in (
        ("sana", "sana", "flow_dpmpp", "flow_prediction", 20),
        ("sprint", "sana-sprint", "scm", "trigflow", 2),
    ):
        b = Bundle.open(tiny_bundle(VARIANTS[variant], models_root))
        m = b.manifest
        assert (m.family, m.prediction_type, m.denoiser, m.latent_channels) == (
            family,
            prediction,
            "transformer",
            LATENT_CHANNELS,
        )
        assert (m.vae_scale_factor, m.vae_scaling_factor, m.vae_shift_factor, m.latent_packing) == (32, 0.41407, 0, 1)
        assert m.defaults == {"steps": steps, "guidance": 4.5, "height": 128, "width": 128}
        assert m.scheduler["name"] == sampler
        config = m.scheduler["config"]
        if variant == "sana":  # the flow form of DPM-Solver++ with SANA's shift
            assert (config["use_flow_sigmas"], config["flow_shift"], config["solver_order"]) == (True, 3.0, 2)
        else:
            assert config["sigma_data"] == 0.5
        c = m.conditioning
        assert (c["joint"], c["max_sequence_length"], c["guidance_embedding"]) == ("sana", 300, variant == "sprint")
        assert c["instruction"].startswith("Given a user prompt") and c["instruction"].endswith("User Prompt: ")
        assert (c["timestep_scale"], c["guidance_embeds_scale"]) == (1.0, 0.1)
        (gemma,) = c["encoders"]
        assert (gemma["component"], gemma["output"], gemma["mask"], gemma["tokenizer"]["pad_id"]) == (
            "text_encoder",
            "last_hidden_state",
            True,
            0,
        )
        text_inputs = [t.name for t in m.components["text_encoder"].inputs]
        assert text_inputs == ["input_ids", "attention_mask", "prefix_keys", "prefix_values"]
        # the instruction's keys and values, all but its last token's (export/gemma_prefix.py)
        instruction_tokens = b.tokenizer_file(gemma["tokenizer"])
        assert c["prefix"]["tokens"] == PromptTokenizer(instruction_tokens, 1, 0).count(c["instruction"]) - 1
        assert b.file(c["prefix"]["file"]).stat().st_size == c["prefix"]["size"]
        inputs = {t.name: t for t in m.components["transformer"].inputs}
        assert inputs["encoder_attention_mask"].dtype == "int64" and inputs["encoder_hidden_states"].shape[2] == 24
        assert ("guidance" in inputs) is (variant == "sprint")
        # DC-AE's encoder for Sprint's image-to-image (SANA has none in diffusers)
        parts = {"text_encoder", "transformer", "vae_decoder", *(["vae_encoder"] if variant == "sprint" else [])}
        assert set(m.components) == parts
        if variant == "sprint":  # deterministic: its graph gives the latent itself, not mean and log-variance
            (latent,) = m.components["vae_encoder"].outputs
            assert (latent.name, latent.shape[1]) == ("latent", LATENT_CHANNELS)
        checks = json.loads((b.path / "manifest.json").read_text())["provenance"]["export_check"]["max_rel_diff"]
        assert set(checks) == parts


def test_sana_families_are_detected_from_configs(models_root):
    from edgediff.export.families import detect_family, get_family
    from edgediff.export.source import load_pipeline, source_facts

    for variant, family in (("sana", "sana"), ("sprint", "sana-sprint")):
        facts = source_facts(load_pipeline(str(tiny_source(VARIANTS[variant], models_root))), "some/model")
        assert facts.transformer_class == "SanaTransformer2DModel"
        assert facts.guidance_embeds is (variant == "sprint")
        assert detect_family(facts).name == family
    sana, sprint = get_family("sana"), get_family("sana-sprint")
    assert (sana.sampler, sana.default_steps, sana.default_guidance, sana.guidance_embedding) == (
        "flow_dpmpp",
        20,
        4.5,
        False,
    )
    assert (sprint.sampler, sprint.default_steps, sprint.default_guidance, sprint.guidance_embedding) == (
        "scm",
        2,
        4.5,
        True,
    )


def test_sana_refusals(models_root, tmp_path):
    pipe = _pipeline(models_root, "sana")
    with pytest.raises(
        InputError, match=r"width must be a multiple of 32 .*VAE's factor.*got 100; nearest valid: 96 or 128"
    ):
        pipe("a red circle", width=100, num_inference_steps=1)
    with pytest.raises(InputError, match=r"height must be a multiple of 32 .*got 16; nearest valid: 32$"):
        pipe("a red circle", height=16, num_inference_steps=1)
    with pytest.raises(InputError, match=r"image= .* is not available for sana bundles"):
        pipe("a red circle", image=np.zeros((64, 64, 3), np.float32), num_inference_steps=1)
    sprint = _pipeline(models_root, "sprint")
    with pytest.raises(InputError, match="negative_prompt is not available for sana-sprint bundles"):
        sprint("a red circle", negative_prompt="blurry", num_inference_steps=1)
    with pytest.raises(InputError, match="true_cfg_scale is not available for sana-sprint bundles: it is FluxPipeline"):
        sprint("a red circle", true_cfg_scale=2.0, num_inference_steps=1)
    for strength in (0.0, 1.5):
        with pytest.raises(InputError, match="strength must be in"):
            sprint("a red circle", image=np.zeros((64, 64, 3), np.uint8), strength=strength, num_inference_steps=2)
    with pytest.raises(InputError, match=r"mask_image= .* is not available for sana-sprint bundles yet: they do "):
        sprint("a red circle", image=np.zeros((64, 64, 3), np.uint8), mask_image=np.ones((64, 64), np.uint8))

    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    with pytest.raises(ExportOptionsError, match="--no-t5 is not available for SANA models"):
        export(str(tiny_source(VARIANTS["sana"], models_root)), tmp_path / "b", ExportOptions(t5=False), False)
    assert not (tmp_path / "b").exists()


def test_sana_latent_output_is_in_the_vae_units(models_root):
    """Sprint's loop runs in sigma_data units: latents out (and decode) are the VAE's, as SanaSprintPipeline's."""
    pipe = _pipeline(models_root, "sprint")
    out = pipe("a red circle", seed=3, num_inference_steps=2, height=64, width=96, output_type="latent")
    assert out.images.shape == (1, LATENT_CHANNELS, 2, 3)
    images = pipe.decode(out.images, output_type="np")
    again = pipe("a red circle", seed=3, num_inference_steps=2, height=64, width=96, output_type="np").images
    assert np.abs(images - again).max() <= PIXEL_ATOL
