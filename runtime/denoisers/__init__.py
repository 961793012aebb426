"""The denoiser a bundle holds, behind one small interface, so that Pipeline._generate keeps one sampling loop.

A denoiser turns prompts into the conditioning its graph takes (fixed over the steps) and builds each step's
feeds (its own input names and timestep form); it also says which image sizes and tasks it takes.
unet.py: the UNet families (SD 1.x / 2.x, SDXL, LCM, Turbo); sd3.py: SD3 / SD3.5's MMDiT transformer; flux.py:
FLUX.1's transformer over packed latents; sana.py: SANA's and SANA-Sprint's DiT with Gemma-2 text; pixart.py:
PixArt-Sigma's DiT with T5 text.
"""

from __future__ import annotations

from .base import SIZE_MULTIPLE, Denoiser, size_multiple
from .flux import FluxDenoiser
from .pixart import PixArtDenoiser
from .sana import SanaDenoiser
from .sd3 import SD3Denoiser
from .unet import UNetDenoiser

DENOISER_CLASSES = {"unet": UNetDenoiser, "transformer": SD3Denoiser}  # by the manifest's denoiser component
# transformers whose text joins otherwise, by the manifest's conditioning "joint"
JOINT_CLASSES = {"flux": FluxDenoiser, "sana": SanaDenoiser, "pixart": PixArtDenoiser}


def make_denoiser(bundle, sessions) -> Denoiser:
    """The denoiser for `bundle`'s denoiser component; `sessions` is the pipeline's SessionPool."""
    m = bundle.manifest
    cls = JOINT_CLASSES.get(m.conditioning.get("joint")) or DENOISER_CLASSES[m.denoiser]
    return cls(bundle, sessions)


__all__ = [
    "SIZE_MULTIPLE",
    "Denoiser",
    "FluxDenoiser",
    "PixArtDenoiser",
    "SD3Denoiser",
    "SanaDenoiser",
    "UNetDenoiser",
    "make_denoiser",
    "size_multiple",
]
