"""Image-to-image for the flow families against diffusers' StableDiffusion3Img2ImgPipeline and FluxImg2ImgPipeline
on the same image, prompt and noise (the VAE's sample and the start noise replayed on both sides)."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, gradient_image  # noqa: E402
from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from tiny_models import tiny_bundle, tiny_sd3_bundle, tiny_source  # noqa: E402

from edgediff.runtime import InputError, Pipeline  # noqa: E402
from edgediff.runtime.denoisers.base import flow_start_index, unet_start_index  # noqa: E402

pytestmark = pytest.mark.export

SIZE = 64
PROMPT = "a red circle"
# family -> (tiny model, diffusers' img2img pipeline, the module whose randn_tensor draws its start noise)
FAMILIES = {
    "sd3": (
        "tiny-sd3",
        "StableDiffusion3Img2ImgPipeline",
        "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3_img2img",
    ),
    "flux-schnell": ("tiny-flux-schnell", "FluxImg2ImgPipeline", "diffusers.pipelines.flux.pipeline_flux_img2img"),
}
# 4 steps at 0.6 and 0.3 run 3 and 2 steps: one more than the UNet pipelines' rounding would
CASES = [
    ("sd3", 4, 0.6, 5.0),  # with CFG
    ("sd3", 4, 0.3, 0.0),
    ("flux-schnell", 4, 0.6, 0.0),
    ("flux-schnell", 4, 0.3, 0.0),
]


def _bundle(family, models_root):
    arch = FAMILIES[family][0]
    return tiny_sd3_bundle(models_root) if family == "sd3" else tiny_bundle(arch, models_root)


def _image() -> np.ndarray:
    """The input as 8-bit pixels, so that both sides see the same values (our runtime reads images as 8-bit)."""
    return (gradient_image(SIZE) * 255).round().astype(np.uint8)


def _reference(family, models_root, monkeypatch, manifest, image, noises, **call):
    import diffusers.models.autoencoders.vae as vae_module

    arch, class_name, module_name = FAMILIES[family]
    pipe = getattr(diffusers, class_name).from_pretrained(str(tiny_source(arch, models_root)))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    patch_diffusers_noise(monkeypatch, vae_module, noises, importlib.import_module(module_name))
    image_t = torch.from_numpy(image.transpose(2, 0, 1)[None].astype(np.float32) / 255)  # [0, 1], at size
    # diffusers' T5 length defaults differ from the bundles' (FLUX: 512): pass the bundle's
    length = manifest.conditioning["max_sequence_length"]
    return pipe(PROMPT, image=image_t, max_sequence_length=length, output_type="np", **call).images


@pytest.mark.parametrize("family,steps,strength,guidance", CASES, ids=[f"{c[0]}-{c[2]:g}" for c in CASES])
def test_flow_img2img_matches_diffusers(models_root, monkeypatch, family, steps, strength, guidance):
    pipe = Pipeline.from_bundle(_bundle(family, models_root), provider="cpu")
    m = pipe.manifest
    image = _image()
    grid = (1, m.latent_channels, SIZE // m.vae_scale_factor, SIZE // m.vae_scale_factor)
    rng = np.random.default_rng(steps)
    noises = [rng.standard_normal(grid).astype(np.float32) for _ in range(2)]  # the VAE's sample, the start noise
    call = dict(strength=strength, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE)
    seen = []
    ours = pipe(
        PROMPT, image=image, output_type="np", generator=ReplayNoise(noises), callback=seen.append, **call
    ).images
    theirs = _reference(family, models_root, monkeypatch, m, image, noises, **call)
    assert len(seen) == steps - flow_start_index(steps, strength) == steps - unet_start_index(steps, strength) + 1
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    plain = pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, output_type="np", seed=0).images
    assert np.abs(ours - plain).max() > PIXEL_ATOL  # the image really steered the result


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 28])
def test_flow_start_index_is_the_pipelines(steps):
    """The timesteps cut by strength as StableDiffusion3Img2ImgPipeline.get_timesteps cuts them (FLUX's is a copy)."""
    from types import SimpleNamespace

    get_timesteps = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps
    for strength in (0.05, 0.1, 0.3, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
        scheduler.set_timesteps(steps)
        _, runs = get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
        assert flow_start_index(steps, strength) == steps - runs == scheduler.begin_index


def test_flow_img2img_refusals(models_root):
    pipe = Pipeline.from_bundle(_bundle("flux-schnell", models_root), provider="cpu")
    image = _image()
    for strength in (0.0, 1.5, -1):
        with pytest.raises(InputError, match="strength must be in"):
            pipe(PROMPT, image=image, strength=strength, num_inference_steps=2)
    mask = np.ones((SIZE, SIZE), np.uint8) * 255
    refusal = r"mask_image= \(inpainting, outpainting\) is not available for flux-schnell bundles yet: they do"
    with pytest.raises(InputError, match=refusal + " text-to-image and image-to-image only"):
        pipe(PROMPT, image=image, mask_image=mask, num_inference_steps=2)
    with pytest.raises(InputError, match=refusal):
        pipe(PROMPT, image=image, outpaint=(16, 0, 0, 0), num_inference_steps=2)
    # the image's own size (rounded down to the 16-pixel grid) is the default
    out = pipe(PROMPT, image=gradient_image(72), strength=0.5, num_inference_steps=2, seed=0)
    assert out.images[0].size == (64, 64)
