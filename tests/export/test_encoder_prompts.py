"""A prompt per text encoder, with diffusers' names: prompt_2 (SDXL's second CLIP, SD3's CLIP-G, FLUX's T5) and
prompt_3 (SD3's T5), and their negatives; against each family's diffusers pipeline from the same latents."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS, reference_pipeline  # noqa: E402
from tiny_models import tiny_bundle, tiny_sd3_bundle, tiny_source  # noqa: E402

from edgediff.runtime import InputError, Pipeline  # noqa: E402

OTHER = ["a small purple triangle at the top", "a large white square"]  # what the second / third encoders read


def _latents(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize(
    "extra",
    [
        {"prompt_2": OTHER},
        {"prompt_2": OTHER, "negative_prompt": ["blurry", "dark"], "negative_prompt_2": "low quality"},
        {"negative_prompt_2": "low quality"},  # no negative_prompt: zeros for both, as diffusers
    ],
    ids=["prompt_2", "negatives", "negative_2-alone"],
)
def test_sdxl_second_encoder_prompts_match_diffusers(models_root, monkeypatch, extra):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sdxl", models_root), provider="cpu", sampler="euler")
    m = pipe.manifest
    side = 64 // m.vae_scale_factor
    latents = _latents((len(PROMPTS), m.latent_channels, side, side))
    call = dict(num_inference_steps=2, guidance_scale=5.0, height=64, width=64)
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call, **extra).images
    reference = reference_pipeline("text2img", tiny_source("tiny-sdxl", models_root), m, "euler", [], monkeypatch)
    theirs = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **call, **extra).images
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    if "prompt_2" in extra:  # the second encoder really read the other prompts
        plain = pipe(PROMPTS, latents=latents, output_type="np", **call).images
        assert np.abs(ours - plain).max() > PIXEL_ATOL


def test_sd3_second_and_third_encoder_prompts_match_diffusers(models_root):
    pipe = Pipeline.from_bundle(tiny_sd3_bundle(models_root), provider="cpu")
    m = pipe.manifest
    latents = _latents((len(PROMPTS), 16, 8, 8))
    call = dict(
        num_inference_steps=2,
        guidance_scale=5.0,
        height=64,
        width=64,
        prompt_2=OTHER,
        prompt_3=OTHER[::-1],
        negative_prompt="blurry",
        negative_prompt_3="dark",
    )
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call).images
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(str(tiny_source("tiny-sd3", models_root)))
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(m.scheduler["config"])
    theirs = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **call).images
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL


def test_flux_t5_prompt_matches_diffusers(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-flux-schnell", models_root), provider="cpu")
    latents = _latents((len(PROMPTS), 16, 16 * 4))  # FluxPipeline's packed latents at 64x64
    call = dict(num_inference_steps=2, guidance_scale=0.0, height=64, width=64, prompt_2=OTHER)
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call).images
    reference = diffusers.FluxPipeline.from_pretrained(str(tiny_source("tiny-flux-schnell", models_root)))
    reference.set_progress_bar_config(disable=True)
    theirs = reference(PROMPTS, latents=torch.from_numpy(latents), output_type="np", **call).images
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL


def test_a_prompt_for_an_encoder_the_bundle_lacks_is_refused(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    with pytest.raises(InputError, match="prompt_2 is for text_encoder_2.*text_encoder"):
        pipe("a cat", prompt_2="a dog", num_inference_steps=1, output_type="latent")
    sdxl = Pipeline.from_bundle(tiny_bundle("tiny-sdxl", models_root), provider="cpu")
    with pytest.raises(InputError, match="prompt_2: 1 prompts for 2 .*one per prompt"):
        sdxl(PROMPTS, prompt_2=["only one"], num_inference_steps=1, output_type="latent")
