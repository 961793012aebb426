"""diffusers' own pipelines as the references of the parity tests: the same model folder, the bundle's
scheduler config, and noise replayed from the arrays our runtime also gets."""

from __future__ import annotations

import importlib

import numpy as np
from replay_noise import ReplayNoise, patch_diffusers_noise

PIXEL_ATOL = 2 / 255  # the parity bound per pixel, images in [0, 1]: two 8-bit steps
PROMPTS = ["a red circle on a blue background", "a large green star at the left"]

SCHEDULER_MODULES = {
    "euler": "scheduling_euler_discrete",
    "euler_ancestral": "scheduling_euler_ancestral_discrete",
    "ddim": "scheduling_ddim",
    "lcm": "scheduling_lcm",
    "tcd": "scheduling_tcd",
}
DIFFUSERS_CLASSES = {
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler",
    "tcd": "TCDScheduler",
}
_SD, _XL = "diffusers.pipelines.stable_diffusion.", "diffusers.pipelines.stable_diffusion_xl."
# (task, SDXL?) -> (pipeline class, the module whose randn_tensor draws the pipeline's own noise)
PIPELINES = {
    ("text2img", False): ("StableDiffusionPipeline", _SD + "pipeline_stable_diffusion"),
    ("text2img", True): ("StableDiffusionXLPipeline", _XL + "pipeline_stable_diffusion_xl"),
    ("img2img", False): ("StableDiffusionImg2ImgPipeline", _SD + "pipeline_stable_diffusion_img2img"),
    ("img2img", True): ("StableDiffusionXLImg2ImgPipeline", _XL + "pipeline_stable_diffusion_xl_img2img"),
    ("inpaint", False): ("StableDiffusionInpaintPipeline", _SD + "pipeline_stable_diffusion_inpaint"),
    ("inpaint", True): ("StableDiffusionXLInpaintPipeline", _XL + "pipeline_stable_diffusion_xl_inpaint"),
}


def reference_pipeline(task: str, source, manifest, sampler: str, noises, monkeypatch):
    """diffusers' pipeline for `task` on `source` (SDXL when the bundle has a second text encoder), with our
    sampler's diffusers twin and every random draw (scheduler, VAE sampling, pipeline) taken from `noises`."""
    import diffusers
    import diffusers.models.autoencoders.vae as vae_module

    sdxl = "text_encoder_2" in manifest.components
    class_name, module_name = PIPELINES[task, sdxl]
    # no watermark (it changes pixels) and no safety checker: the images are compared as they come
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, class_name).from_pretrained(str(source), **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, DIFFUSERS_CLASSES[sampler]).from_config(manifest.scheduler["config"])
    patch_diffusers_noise(
        monkeypatch,
        importlib.import_module(f"diffusers.schedulers.{SCHEDULER_MODULES[sampler]}"),
        noises,
        vae_module,
        importlib.import_module(module_name),
    )
    return pipe


def text_to_image_reference(
    source, sampler, manifest, prompt, steps, guidance, latents, monkeypatch, noises, negative=None
):
    """diffusers' text-to-image images for these prompts, latents and sampler noise."""
    import torch

    pipe = reference_pipeline("text2img", source, manifest, sampler, noises, monkeypatch)
    # StableDiffusionPipeline passes its own eta (0.0) to any step that takes one; TCD's default gamma is 0.3.
    eta = {"tcd": 0.3}.get(sampler, 0.0)
    out = pipe(
        prompt,
        negative_prompt=negative,
        eta=eta,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        output_type="np",
        height=manifest.defaults["height"],
        width=manifest.defaults["width"],
    )
    return out.images


def ours_and_diffusers(pipe, source, sampler, steps, guidance, monkeypatch):
    """The pipeline's images and diffusers' on the same prompts, initial latents and sampler noise."""
    from edgediff.runtime.schedulers import SAMPLERS

    m = pipe.manifest
    shape = (
        len(PROMPTS),
        m.latent_channels,
        m.defaults["height"] // m.vae_scale_factor,
        m.defaults["width"] // m.vae_scale_factor,
    )
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal(shape).astype(np.float32)
    noises = (
        [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)] if SAMPLERS[sampler].stochastic else []
    )
    ours = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents,
        output_type="np",
        generator=ReplayNoise(noises),
    ).images
    theirs = text_to_image_reference(source, sampler, m, PROMPTS, steps, guidance, latents, monkeypatch, noises)
    return ours, theirs


def gradient_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB gradient with a little noise, (size, size, 3) in [0, 1]: an input image for img2img."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, size, dtype=np.float32)
    img = np.stack([np.outer(base, base), np.outer(base[::-1], base), np.full((size, size), 0.3, np.float32)], -1)
    return np.clip(img + rng.normal(0, 0.05, img.shape).astype(np.float32), 0, 1)


def control_pictures(names=("canny", "depth", "pose"), width: int = 80, height: int = 72) -> dict:
    """Control images, one per name: shapes on a background, a different layout each, at another size than the
    tiny models' output (80 x 72 for 64 x 64), so that both pipelines resize them."""
    from PIL import Image, ImageDraw

    pictures = {}
    for seed, name in enumerate(names):
        rng = np.random.default_rng(seed)
        picture = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw = ImageDraw.Draw(picture)
        draw.rectangle([width // 8, height // 4, width // 2, 3 * height // 4], fill=(230, 40, 40))
        draw.ellipse([5 * width // 8, height // 3, 7 * width // 8, 2 * height // 3], fill=(250, 250, 250))
        pictures[name] = picture
    return pictures


def controlnet_arguments(images: list, scales, starts, ends, image_argument: str = "control_image") -> dict:
    """A diffusers ControlNet pipeline's per-ControlNet arguments: values for one ControlNet, lists for several (its
    MultiControlNetModel). `image_argument`: the UNet pipelines call the control image `image`."""
    one = len(images) == 1
    return {
        image_argument: images[0] if one else list(images),
        "controlnet_conditioning_scale": scales[0] if one else list(scales),
        "control_guidance_start": starts[0] if one else list(starts),
        "control_guidance_end": ends[0] if one else list(ends),
    }
