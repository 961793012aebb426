"""diffusers' own pipelines as the references of the parity tests: the same model folder, the bundle's
scheduler config, and noise replayed from the arrays our runtime also gets."""

from __future__ import annotations

import importlib

from conftest import patch_diffusers_noise

SCHEDULER_MODULES = {
    "euler": "scheduling_euler_discrete", "euler_ancestral": "scheduling_euler_ancestral_discrete",
    "ddim": "scheduling_ddim", "lcm": "scheduling_lcm", "tcd": "scheduling_tcd",
}
DIFFUSERS_CLASSES = {
    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler",
    "lcm": "LCMScheduler", "tcd": "TCDScheduler",
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
    patch_diffusers_noise(monkeypatch, importlib.import_module(f"diffusers.schedulers.{SCHEDULER_MODULES[sampler]}"),
                          noises, vae_module, importlib.import_module(module_name))
    return pipe
