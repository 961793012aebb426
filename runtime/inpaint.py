"""Inpainting and outpainting helpers: the mask at pixel and latent resolution, the padded canvas for
outpainting, and pasting the original pixels back outside the mask.

Masks follow diffusers: white (>= 0.5) is repainted, black is kept.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .image import load_image

OUTPAINT_FILL = (127, 127, 127)  # neutral grey under the new area (masked anyway; keeps the encoder calm)


def prepare_mask(mask_image, height: int, width: int, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, 1, H, W) and (1, 1, H/f, W/f) float32 masks of 0 and 1 (diffusers' binarised mask, then
    nearest-neighbour down to the latent grid, as torch's interpolate does)."""
    mask = load_image(mask_image).convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.LANCZOS)
    pixels = (np.asarray(mask, dtype=np.float32) / 255.0 >= 0.5).astype(np.float32)[None, None]
    return pixels, np.ascontiguousarray(pixels[:, :, ::factor, ::factor])


def outpaint_canvas(image, left: int, top: int, right: int, bottom: int, multiple: int = 8):
    """The image on a larger canvas (grown to a multiple of `multiple`) and the mask of the new area."""
    image = load_image(image)
    if min(left, top, right, bottom) < 0:
        raise ValueError("outpaint margins must be >= 0")
    width, height = image.width + left + right, image.height + top + bottom
    right += -width % multiple
    bottom += -height % multiple
    canvas = Image.new("RGB", (image.width + left + right, image.height + top + bottom), OUTPAINT_FILL)
    canvas.paste(image, (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


def overlay(images: np.ndarray, original: Image.Image, mask_px: np.ndarray) -> np.ndarray:
    """NHWC images in [0, 1] with the original's pixels (same size) restored wherever the mask keeps them."""
    keep = (mask_px[0, 0] < 0.5)[None, :, :, None]
    source = np.asarray(original.convert("RGB"), dtype=np.float32) / 255.0
    return np.where(keep, source[None], images).astype(np.float32)
