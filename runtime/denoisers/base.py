"""What every denoiser offers the pipeline, and the image-size rule they share."""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ..errors import InputError

SIZE_MULTIPLE = 8  # as diffusers: the latent grid must stay whole through the VAE


def size_multiple(manifest) -> int:
    """Image sides must be multiples of this: 8, and the VAE's factor times the latent cells the denoiser needs
    per side (a transformer's patch; a UNet's 2**upsamplers)."""
    return math.lcm(SIZE_MULTIPLE, manifest.vae_scale_factor * _latent_multiple(manifest))


def _latent_multiple(manifest) -> int:
    """Latent cells each side must hold a whole number of: a transformer's patch (SD3) times FLUX's packing (its
    patch_size is 1); a UNet's 2**upsamplers, whose traced 2x upsamplings meet their skip connections only then
    (bundles exported before the UNet's was recorded: 1, unchecked)."""
    spec = manifest.components.get("transformer")
    if spec is not None:
        return int(spec.attributes.get("patch_size") or 1) * int(getattr(manifest, "latent_packing", 1))
    spec = manifest.components.get("unet")
    return int((spec.attributes.get("latent_multiple") if spec is not None else None) or 1)


def check_size(manifest, what: str, value) -> None:
    """Raises InputError unless `value` is a valid image side for this bundle; where the multiple is not the usual
    8 (a transformer's patch, 16 for SD3; DC-AE's 32 for SANA; a UNet's halvings, 64 for SD) the error names the
    nearest valid sides."""
    multiple = size_multiple(manifest)
    if not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError("size_multiple", what=what, multiple=multiple, value=value)
    if value % multiple == 0:
        return
    if multiple == SIZE_MULTIPLE:
        raise InputError("size_multiple", what=what, multiple=multiple, value=value)
    below = value // multiple * multiple
    nearest = " or ".join(str(v) for v in (below, below + multiple) if v > 0)
    cells, vae = _latent_multiple(manifest), manifest.vae_scale_factor
    if cells == 1:
        raise InputError("size_vae", what=what, multiple=multiple, value=value, nearest=nearest)
    if "transformer" in manifest.components:
        key, detail = "size_patch", {"patch": cells}
    else:
        key, detail = "size_unet", {"halvings": cells.bit_length() - 1}
    raise InputError(key, what=what, multiple=multiple, vae=vae, value=value, nearest=nearest, **detail)


class Denoiser(Protocol):
    component: str  # the graph the sampling loop calls once per step (and per CFG batch)
    text: object  # the prompt conditioner: .components (its graphs), .tokenizer (the first one)
    in_channels: int  # the graph's latent input channels (9 for inpainting UNets)
    guidance_embedded: bool  # LCM: guidance enters as an embedding, never as a second (unconditional) batch
    image_tasks: tuple[str, ...]  # of IMAGE_TASKS, what `image=` may do ("img2img", "inpaint"); () for none
    true_cfg: bool  # FLUX: a negative-prompt batch on top of embedded guidance (FluxPipeline's true_cfg_scale)

    def condition(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        do_cfg: bool,
        repeat: int,
        height: int,
        width: int,
        guidance: float,
        timings: dict,
        max_sequence_length: int | None = None,
    ) -> dict[str, np.ndarray]:
        """The feeds that stay fixed over the steps (text, pooled text, size or guidance conditions), for
        len(prompts) * repeat images; with CFG the unconditional half comes first, as in diffusers."""
        ...

    def feeds(self, model_in: np.ndarray, timestep, fixed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One step's graph inputs: the latents (with any CFG batch), the timestep in the graph's form, and
        the fixed feeds."""
        ...

    def prediction(self, output: np.ndarray) -> np.ndarray:
        """The model prediction the sampler takes from the graph's output (PixArt drops its variance channels)."""
        ...

    def latent_shape(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        """The sampling loop's latent shape (what `latents=` takes) for a (B, C, h, w) grid."""
        ...

    def pack(self, grid: np.ndarray) -> np.ndarray:
        """The sampling loop's latents from (B, C, h, w) latents (FLUX: packed into tokens)."""
        ...

    def unpack(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        """(B, C, h, w) latents, for the VAE, from the sampling loop's."""
        ...

    def schedule(self, sampler, steps: int, height: int, width: int) -> dict:
        """Keyword arguments for sampler.set_timesteps besides the step count (FLUX: its sigmas and mu)."""
        ...

    def start_index(self, steps: int, strength: float) -> int:
        """Image-to-image: the first of the set timesteps to run at `strength` (the pipeline's get_timesteps)."""
        ...


# image tasks by the name a denoiser lists them under, as error messages call them
IMAGE_TASKS = {"img2img": "image-to-image", "inpaint": "inpainting"}


def unet_start_index(steps: int, strength: float) -> int:
    """StableDiffusionImg2ImgPipeline.get_timesteps: the strength's share of the steps is rounded down, so a low
    strength may run no step (the pipeline says so)."""
    return steps - min(int(steps * strength), steps)


def flow_start_index(steps: int, strength: float) -> int:
    """StableDiffusion3Img2ImgPipeline / FluxImg2ImgPipeline.get_timesteps: the skipped share is rounded down
    instead, so one more step may run than for UNets (4 steps at 0.6: 3, where UNets run 2) and at least one
    always does. The float expression is theirs on purpose, so that products such as 10 * 0.7 round as there."""
    return int(max(steps - min(steps * strength, steps), 0))


def per_row(model_in: np.ndarray, value) -> np.ndarray:
    """A transformer's timestep (or guidance) input: `value` once per batch row, as the pipelines' t.expand(batch)."""
    return np.full((model_in.shape[0],), value, np.float32)


class DenoiserBase:
    """Defaults for denoisers whose sampling loop runs on the (B, C, h, w) latent grid with the sampler's own
    timesteps (the UNets, SD3)."""

    true_cfg = False

    def prediction(self, output: np.ndarray) -> np.ndarray:
        return output

    def latent_shape(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        return grid

    def pack(self, grid: np.ndarray) -> np.ndarray:
        return grid

    def unpack(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        return latents

    def schedule(self, sampler, steps: int, height: int, width: int) -> dict:
        return {}

    def start_index(self, steps: int, strength: float) -> int:
        return unet_start_index(steps, strength)
