"""PixArt-Sigma: a DiT over the SD VAE's latents with T5 text and its attention mask, a learned variance the sampler
drops, and the VP DPM-Solver++ with CFG; against diffusers' PixArtSigmaPipeline on a tiny random model from the
same latents."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402

ARCH = "tiny-pixart-sigma"
LATENT_CHANNELS, VAE_FACTOR = 4, 8  # the tiny model's (models/random_init.py)


def _pipeline(models_root) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle(ARCH, models_root), provider="cpu")


def _reference(models_root, latents, **call):
    """diffusers' images from the same folder: no resolution binning (our runtime generates at the size asked), no
    caption cleaning (it needs bs4 and ftfy; the runtime lower-cases and strips, as the pipeline does without)."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tiny_source(ARCH, models_root)))
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        latents=torch.from_numpy(latents), output_type="np", use_resolution_binning=False, clean_caption=False, **call
    ).images


def _latents(batch, height, width, seed):
    shape = (batch, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CASES = [
    # steps, guidance, (height, width), images per prompt, max_sequence_length, negative prompt
    (2, 4.5, (64, 48), 1, None, None),  # CFG with the default "" negative, 300 T5 tokens, non-square
    (2, 1.0, (48, 64), 2, 32, None),  # no CFG, a batch per prompt, a short text
    (3, 3.0, (64, 64), 1, 48, "Blurry, low quality "),  # a negative prompt (stripped, lower-cased); second order
]


@pytest.mark.parametrize(
    "steps,guidance,size,per_prompt,length,negative",
    CASES,
    ids=[f"{c[0]}-g{c[1]:g}-{c[2][0]}x{c[2][1]}-x{c[3]}-len{c[4]}-{'neg' if c[5] else 'noneg'}" for c in CASES],
)
def test_pixart_sigma_matches_diffusers(models_root, steps, guidance, size, per_prompt, length, negative):
    pipe = _pipeline(models_root)
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
    theirs = _reference(models_root, latents, prompt=PROMPTS, negative_prompt=negative or "", **call)
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts and latents: different images


def test_pixart_sigma_negative_prompt_changes_the_image(models_root):
    pipe = _pipeline(models_root)
    call = dict(latents=_latents(1, 64, 64, 0), num_inference_steps=2, height=64, width=64, output_type="np")
    a, b = (pipe("a red circle", negative_prompt=n, **call).images for n in (None, "a blue square"))
    assert np.abs(a - b).max() > PIXEL_ATOL


def test_pixart_sigma_manifest_records_what_the_runtime_needs(models_root):
    b = Bundle.open(tiny_bundle(ARCH, models_root))
    m = b.manifest
    assert (m.family, m.prediction_type, m.denoiser, m.latent_channels) == ("pixart-sigma", "epsilon", "transformer", 4)
    assert (m.vae_scale_factor, m.vae_scaling_factor, m.vae_shift_factor, m.latent_packing) == (8, 0.13025, 0, 1)
    # 20 steps at guidance 4.5; the size is the transformer's sample_size x 8 (1024 for PixArt-Sigma-XL-2-1024-MS)
    assert m.defaults == {"steps": 20, "guidance": 4.5, "height": 64, "width": 64}
    assert m.scheduler["name"] == "dpmpp"
    config = m.scheduler["config"]
    assert (config["algorithm_type"], config["solver_order"], config["solver_type"]) == ("dpmsolver++", 2, "midpoint")
    assert (config["prediction_type"], config["lower_order_final"], config["timestep_spacing"]) == (
        "epsilon",
        True,
        "linspace",
    )
    c = m.conditioning
    assert (c["joint"], c["max_sequence_length"]) == ("pixart", 300)
    (t5,) = c["encoders"]
    assert (t5["component"], t5["output"], t5["mask"], t5["tokenizer"]["max_length"]) == (
        "text_encoder",
        "last_hidden_state",
        True,
        300,
    )
    assert [t.name for t in m.components["text_encoder"].inputs] == ["input_ids", "attention_mask"]
    inputs = {t.name: t for t in m.components["transformer"].inputs}
    assert inputs["encoder_attention_mask"].dtype == "int64" and inputs["encoder_hidden_states"].shape[2] == 96
    assert m.components["transformer"].outputs[0].shape[1] == 2 * LATENT_CHANNELS  # epsilon and the learned variance
    assert m.components["transformer"].attributes["patch_size"] == 2
    assert set(m.components) == {"text_encoder", "transformer", "vae_decoder"}  # text-to-image only
    checks = json.loads((b.path / "manifest.json").read_text())["provenance"]["export_check"]["max_rel_diff"]
    assert set(checks) == {"text_encoder", "transformer", "vae_decoder"}


def test_pixart_sigma_family_is_detected_from_configs(models_root):
    from edgediff.export.families import detect_family, get_family
    from edgediff.export.source import load_pipeline, source_facts

    facts = source_facts(load_pipeline(str(tiny_source(ARCH, models_root))), "some/model")
    assert (facts.transformer_class, facts.cross_attention_dim) == ("PixArtTransformer2DModel", 96)
    assert detect_family(facts).name == "pixart-sigma"
    fam = get_family("pixart-sigma")
    assert (fam.sampler, fam.default_steps, fam.default_guidance, fam.guidance_embedding) == ("dpmpp", 20, 4.5, False)


def test_pixart_sigma_refusals(models_root, tmp_path):
    pipe = _pipeline(models_root)
    # patch 2 x VAE 8: sides are multiples of 16
    with pytest.raises(InputError, match=r"width must be a multiple of 16 .*patch.*got 56; nearest valid: 48 or 64"):
        pipe("a red circle", width=56, num_inference_steps=1)
    with pytest.raises(InputError, match=r"height must be a multiple of 16 .*got 8; nearest valid: 16$"):
        pipe("a red circle", height=8, num_inference_steps=1)
    with pytest.raises(InputError, match=r"image= .* is not available for pixart-sigma bundles"):
        pipe("a red circle", image=np.zeros((64, 64, 3), np.float32), num_inference_steps=1)

    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    with pytest.raises(ExportOptionsError, match="--no-t5 is not available for PixArt models"):
        export(str(tiny_source(ARCH, models_root)), tmp_path / "b", ExportOptions(t5=False), False)
    assert not (tmp_path / "b").exists()
