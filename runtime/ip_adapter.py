"""A reference image (IP-Adapter) at run time, as diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline
with `load_ip_adapter`.

A bundle exported with `--ip-adapter` holds the CLIP vision encoder as a graph of its own (`image_encoder`:
normalised pixels -> image_embeds) and a UNet that takes `image_embeds` and `ip_adapter_scale` as inputs, the image
projection inside it (export/ip_adapter.py). Per call the reference image is encoded once; classifier-free
guidance's unconditional half gets what diffusers' encode_image gives it: zero embeddings for the plain IP-Adapter,
the encoder's penultimate hidden state of a zero image (zeros after CLIP's normalisation) for IP-Adapter Plus,
encoded in the same run as the reference image. Without a reference image the UNet gets zero embeddings at scale 0:
exactly the plain model's image.

    pipe(prompt, ip_adapter_image=reference, ip_adapter_scale=0.6)

The image is prepared as CLIPImageProcessor does (diffusers' load_ip_adapter makes one sized to the encoder): RGB,
shortest side resized to the encoder's size (224 for the published encoders) with bicubic resampling, centre
crop to a square of that size, scaled to [0, 1] and normalised with CLIP's mean and std.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
from PIL import Image

from .errors import InputError
from .image import load_image


def clip_pixels(image, size: int, mean, std) -> np.ndarray:
    """(1, 3, size, size) float32 as CLIPImageProcessor(size=size, crop_size=size) makes them."""
    pil = load_image(image)
    width, height = pil.size
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)  # transformers' get_resize_output_image_size rounds down
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    pil = pil.resize((new_width, new_height), Image.BICUBIC)
    array = np.asarray(pil, dtype=np.float32)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    array = array[top : top + size, left : left + size] / np.float32(255.0)
    array = (array - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return array.transpose(2, 0, 1)[None].astype(np.float32)


PLUS = "plus"  # manifest.ip_adapter["kind"]; bundles before Plus have none and are plain


def idle_feeds(entry: dict, rows: int) -> dict[str, np.ndarray]:
    """The UNet's IP-Adapter inputs when a call has no reference image: zero embeddings at scale 0."""
    length = entry.get("embeds_length")  # Plus: hidden-state tokens per image
    shape = (rows, int(entry["embeds_dim"])) if length is None else (rows, int(length), int(entry["embeds_dim"]))
    return {entry["image_embeds"]: np.zeros(shape, np.float32), entry["scale"]: np.array(0.0, np.float32)}


class IPAdapter:
    """A bundle's IP-Adapter (manifest.ip_adapter), or none."""

    def __init__(self, manifest, bundle_path):
        self.path = bundle_path
        self.entry = manifest.ip_adapter

    def feeds(self, image, scale, batch: int, do_cfg: bool, timings: dict, run: Callable) -> dict[str, np.ndarray]:
        """The UNet's image embeddings (unconditional zeros first with CFG) and scale for one call of `batch`
        images; {} without `image`. `run(component, **feeds)` runs a graph."""
        if image is None:
            return {}
        if self.entry is None:
            raise InputError("ip_adapter_missing", path=self.path)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise InputError("ip_adapter_scale", value=scale)
        if not math.isfinite(float(scale)):
            raise InputError("ip_adapter_scale", value=scale)
        e = self.entry
        try:
            pixels = clip_pixels(image, int(e["image_size"]), e["image_mean"], e["image_std"])
        except (OSError, ValueError, TypeError) as exc:
            raise InputError("ip_adapter_image", detail=exc) from None
        plus = e.get("kind") == PLUS
        if plus and do_cfg:  # diffusers encodes torch.zeros_like(pixel_values) for Plus's negative
            pixels = np.concatenate([pixels, np.zeros_like(pixels)])
        t0 = time.perf_counter()
        encoded = run(e["component"], pixel_values=pixels)[0].astype(np.float32)
        timings.setdefault(e["component"], []).append(time.perf_counter() - t0)
        embeds = np.repeat(encoded[:1], batch, axis=0)  # one reference image for every image of the call
        if do_cfg:
            negative = np.repeat(encoded[1:], batch, axis=0) if plus else np.zeros_like(embeds)
            embeds = np.concatenate([negative, embeds])
        return {e["image_embeds"]: embeds, e["scale"]: np.array(scale, np.float32)}
