"""Export -> runtime, from fixed latents, against diffusers' own pipeline on the same model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import ReplayNoise  # noqa: E402
from references import reference_pipeline  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Pipeline  # noqa: E402
from edgediff.runtime.schedulers import SAMPLERS  # noqa: E402

PIXEL_ATOL = 2 / 255  # the bound per pixel, images in [0, 1]
PROMPTS = ["a red circle on a blue background", "a large green star at the left"]



def _reference(source, sampler, manifest, prompt, steps, guidance, latents, monkeypatch, noises, negative=None):
    pipe = reference_pipeline("text2img", source, manifest, sampler, noises, monkeypatch)
    # StableDiffusionPipeline passes its own eta (0.0) to any step that takes one; TCD's default gamma is 0.3.
    eta = {"tcd": 0.3}.get(sampler, 0.0)
    out = pipe(prompt, negative_prompt=negative, eta=eta, num_inference_steps=steps, guidance_scale=guidance,
               latents=torch.from_numpy(latents), output_type="np",
               height=manifest.defaults["height"], width=manifest.defaults["width"])
    return out.images


CASES = [
    # arch, sampler, steps, guidance
    ("tiny-sd1", "euler", 1, 7.5),
    ("tiny-sd1", "euler", 4, 7.5),
    ("tiny-sd1", "ddim", 3, 5.0),
    ("tiny-sd1", "euler_ancestral", 3, 7.5),
    ("tiny-sd2-v", "euler", 3, 7.5),
    ("tiny-sd2-v", "ddim", 1, 7.5),
    ("tiny-sd-turbo", "euler", 1, 0.0),
    ("tiny-sd-turbo", "euler_ancestral", 4, 0.0),
    ("tiny-lcm", "lcm", 1, 8.0),
    ("tiny-lcm", "lcm", 4, 8.0),
    ("tiny-lcm", "tcd", 4, 3.0),
    ("tiny-bk-sdm", "euler", 3, 7.5),  # pruned UNet without a mid-block (BK-SDM, small-sd)
    ("tiny-sdxs", "euler", 1, 0.0),  # one-step student with cross-attention in one block only (SDXS)
]


def ours_and_diffusers(pipe, source, sampler, steps, guidance, monkeypatch):
    """The pipeline's images and diffusers' on the same prompts, initial latents and sampler noise."""
    m = pipe.manifest
    shape = (len(PROMPTS), m.latent_channels, m.defaults["height"] // m.vae_scale_factor,
             m.defaults["width"] // m.vae_scale_factor)
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal(shape).astype(np.float32)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)] if SAMPLERS[sampler].stochastic else []
    ours = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, latents=latents, output_type="np",
                generator=ReplayNoise(noises)).images
    theirs = _reference(source, sampler, m, PROMPTS, steps, guidance, latents, monkeypatch, noises)
    return ours, theirs


@pytest.mark.parametrize("arch,sampler,steps,guidance", CASES, ids=[f"{a}-{s}-{n}" for a, s, n, _ in CASES])
def test_runtime_matches_diffusers(models_root, monkeypatch, arch, sampler, steps, guidance):
    pipe = Pipeline.from_bundle(tiny_bundle(arch, models_root), provider="cpu", sampler=sampler)
    ours, theirs = ours_and_diffusers(pipe, tiny_source(arch, models_root), sampler, steps, guidance, monkeypatch)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    # The comparison must be able to fail: a different sample gives a different image.
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL


def test_negative_prompt_matches_diffusers(models_root, monkeypatch):
    bundle = tiny_bundle("tiny-sd1", models_root)
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    m = pipe.manifest
    latents = np.random.default_rng(5).standard_normal((1, 4, m.defaults["height"] // 2, m.defaults["width"] // 2)).astype(np.float32)
    ours = pipe(PROMPTS[0], negative_prompt="blurry black", num_inference_steps=2, latents=latents, output_type="np").images
    theirs = _reference(tiny_source("tiny-sd1", models_root), m.scheduler["name"], m, PROMPTS[0], 2, m.defaults["guidance"],
                        latents, monkeypatch, [], negative="blurry black")
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
