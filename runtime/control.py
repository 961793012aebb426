"""ControlNets at run time, as diffusers' StableDiffusionControlNetPipeline, StableDiffusionXLControlNetPipeline,
StableDiffusion3ControlNetPipeline and FluxControlNetPipeline.

A bundle exported with `--controlnet` holds each ControlNet as a graph of its own, and a UNet (SD3, FLUX: a
transformer) that takes their residuals (block samples) as inputs (zeros when a call has no control:
UNetDenoiser.feeds, SD3Denoiser.feeds, FluxDenoiser.feeds). Per step, each active ControlNet runs on the denoiser's
own feeds plus its control image; its residuals are scaled by its `controlnet_conditioning_scale` and summed over the
ControlNets (MultiControlNetModel, SD3MultiControlNetModel, FluxMultiControlNetModel), then replace the zeros.

    pipe(prompt, control_image=edges)                                    # a bundle with one ControlNet
    pipe(prompt, control_image={"canny": edges, "depth": depth},         # several, by name
         controlnet_conditioning_scale={"canny": 1.0, "depth": 0.5}, control_guidance_end=0.8)

Control images are preprocessed as diffusers' control image processor does: RGB, resized to the output size with
Lanczos (any size is accepted), scaled to [0, 1] (not [-1, 1]), repeated for every image of the batch and again for
the unconditional half of classifier-free guidance. SD3's ControlNets take the control image's VAE latents instead:
the image in [-1, 1] through the bundle's VAE encoder, one sample per image of the batch drawn from the call's noise
(diffusers draws it from torch's global generator), then (sample - shift) * the VAE's scaling factor, where the shift
is the VAE's, or 0 for ControlNets that force zeros for the pooled text (InstantX's), as the pipeline does. FLUX's
take them shifted by the VAE's shift and packed into tokens as the latents are; with a negative batch (true CFG) they
run on the prompt's half alone and their samples serve both halves, as FluxControlNetPipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from .errors import InputError
from .image import load_image


def residual_inputs(unet_spec) -> list[dict]:
    """The denoiser's residual inputs as the manifest records them ({"name", "level", "channels"}, down ones then
    the mid one; SD3: one per ControlNet block, with "tokens"), or [] for a denoiser without them."""
    return list(unet_spec.attributes.get("controlnet_residuals") or [])


def taken_residuals(spec) -> list[dict]:
    """Of residual_inputs, those the graph takes: a block sample that no SD3 transformer block adds (the last
    block's, when a ControlNet has as many blocks as the transformer) is left out of the graph at export."""
    names = {t.name for t in spec.inputs}
    return [r for r in residual_inputs(spec) if r["name"] in names]


def zero_residuals(residuals: list[dict], sample: np.ndarray) -> dict[str, np.ndarray]:
    """Zeros for each residual input at `sample`'s batch and size: the denoiser then runs as without ControlNets
    (SD3's block samples: (batch, tokens, channels); FLUX's `sample` is already packed, (batch, tokens, width), and
    its block samples have its tokens)."""
    if sample.ndim == 3:
        return {r["name"]: np.zeros((*sample.shape[:2], r["channels"]), np.float32) for r in residuals}
    batch, _, h, w = sample.shape
    return {r["name"]: np.zeros(_residual_shape(r, batch, h, w), np.float32) for r in residuals}


def _residual_shape(r: dict, batch: int, h: int, w: int) -> tuple[int, ...]:
    sides = _side(h, r["level"]), _side(w, r["level"])
    if r.get("tokens"):
        return (batch, sides[0] * sides[1], r["channels"])
    return (batch, r["channels"], *sides)


def _side(cells: int, level: int) -> int:
    for _ in range(level):  # each stride-2 downsampling rounds up, as the UNet's convolutions do
        cells = (cells + 1) // 2
    return cells


def prepare_control_image(image, height: int, width: int, batch: int, do_cfg: bool, channels: int = 3) -> np.ndarray:
    """(batch [x2 with CFG], channels, height, width) float32 in [0, 1], as diffusers' prepare_image: resized with
    Lanczos when its size differs from the output's."""
    pil = load_image(image)
    if pil.size != (width, height):
        pil = pil.resize((width, height), Image.LANCZOS)
    if channels == 1:
        pil = pil.convert("L")
    array = np.asarray(pil, dtype=np.float32) / 255.0
    array = (array[None, None] if array.ndim == 2 else array.transpose(2, 0, 1)[None]).astype(np.float32)
    array = np.repeat(array, batch, axis=0)
    return np.concatenate([array, array]) if do_cfg else array


@dataclass
class _Net:
    name: str
    component: str
    image: np.ndarray
    scale: float
    start: float
    end: float
    latent_shift: float | None = None  # SD3, FLUX: `image` is the control image in [-1, 1], to be VAE-encoded
    prompt_only: bool = False  # FLUX: with a negative batch, run on the prompt's half, its samples serving both

    def scale_at(self, step: int, total: int) -> float:
        """The scale this step, as diffusers' controlnet_keep: 0 outside [start, end] of the steps."""
        keep = 1.0 - float(step / total < self.start or (step + 1) / total > self.end)
        return self.scale * keep


class ControlNets:
    """A bundle's ControlNets (by name, in the manifest's order) and the denoiser's residual inputs they feed."""

    def __init__(self, manifest, bundle_path):
        self.path = bundle_path
        self.vae = (float(manifest.vae_shift_factor), float(manifest.vae_scaling_factor))
        self.entries = {c["name"]: c for c in manifest.controlnets}
        denoiser = manifest.components[manifest.denoiser]
        self.residuals = residual_inputs(denoiser) if self.entries else []
        self.taken = {r["name"] for r in taken_residuals(denoiser)}
        self.components = {name: manifest.components[c["component"]] for name, c in self.entries.items()}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def prepare(
        self,
        control_image,
        scale,
        start,
        end,
        height: int,
        width: int,
        batch: int,
        do_cfg: bool,
        timings: dict,
        encode: Callable | None = None,
    ) -> "ControlCall | None":
        """One call's ControlNets with their images, scales and guidance windows; None without control_image.
        `encode(image)`: (batch, C, h, w) latents of a (1, 3, H, W) image in [-1, 1], (sample - the VAE's shift) *
        its scale (FLUX: packed into tokens), called on the first step (SD3's and FLUX's ControlNets)."""
        if control_image is None:
            return None
        if not self.entries:
            raise InputError("controlnet_missing", path=self.path)
        images = self._images(control_image)
        names = list(images)
        scales = self._per_net(scale, names, "controlnet_conditioning_scale")
        starts = self._per_net(start, names, "control_guidance_start")
        ends = self._per_net(end, names, "control_guidance_end")
        nets = []
        for name in names:
            try:
                s, e, weight = float(starts[name]), float(ends[name]), float(scales[name])
            except (TypeError, ValueError):
                raise InputError(
                    "controlnet_value", name=name, scale=scales[name], start=starts[name], end=ends[name]
                ) from None
            if not 0.0 <= s < e <= 1.0:
                raise InputError("controlnet_guidance", start=s, end=e)
            channels = int(self.entries[name].get("conditioning_channels", 3))
            latents = self.entries[name].get("control_latents")
            try:
                if latents is None:
                    image = prepare_control_image(images[name], height, width, batch, do_cfg, channels)
                else:  # one image in [-1, 1] for the VAE encoder
                    image = prepare_control_image(images[name], height, width, 1, False) * 2.0 - 1.0
            except (OSError, ValueError, TypeError) as exc:
                raise InputError("controlnet_image", name=name, detail=exc) from None
            shift = None if latents is None else float(latents["shift_factor"])
            prompt_only = bool(self.entries[name].get("prompt_only"))
            nets.append(_Net(name, self.entries[name]["component"], image, weight, s, e, shift, prompt_only))
        return ControlCall(nets, self.residuals, self.components, timings, encode, self.vae, do_cfg, self.taken)

    def _known(self) -> str:
        return ", ".join(self.entries)

    def _images(self, control_image) -> dict:
        if isinstance(control_image, dict):
            self._check_names(control_image)
            return dict(control_image)
        if isinstance(control_image, (list, tuple)):  # one per ControlNet, in the manifest's order (diffusers' Multi)
            if len(control_image) != len(self.entries):
                raise InputError(
                    "controlnet_count",
                    what="control_image",
                    found=len(control_image),
                    count=len(self.entries),
                    known=self._known(),
                )
            return dict(zip(self.entries, control_image))
        if len(self.entries) != 1:
            raise InputError("controlnet_which", count=len(self.entries), known=self._known())
        return {self.names[0]: control_image}

    def _check_names(self, given: dict) -> None:
        for name in given:
            if name not in self.entries:
                raise InputError("controlnet_unknown", name=name, known=self._known())

    def _per_net(self, value, names: list[str], what: str) -> dict:
        """A float for every ControlNet, a list in control_image's order, or a dict by name (others: defaults)."""
        if isinstance(value, dict):
            self._check_names(value)
            default = {"controlnet_conditioning_scale": 1.0, "control_guidance_start": 0.0}.get(what, 1.0)
            return {name: value.get(name, default) for name in names}
        if isinstance(value, (list, tuple)):
            if len(value) != len(names):
                raise InputError(
                    "controlnet_count", what=what, found=len(value), count=len(names), known=", ".join(names)
                )
            return dict(zip(names, value))
        return dict.fromkeys(names, value)


class ControlCall:
    """One call's active ControlNets: per step, the summed, scaled residuals the denoiser takes."""

    def __init__(
        self,
        nets: list[_Net],
        residuals: list[dict],
        components: dict,
        timings: dict,
        encode: Callable | None = None,
        vae: tuple[float, float] = (0.0, 1.0),
        do_cfg: bool = False,
        taken: set | None = None,
    ):
        self.nets = nets
        self.residual_names = [r["name"] for r in residuals]  # the ControlNets' outputs, in order
        self.taken = set(self.residual_names) if taken is None else taken  # those the denoiser takes
        # each graph takes the denoiser's feeds it names, besides its control image
        self.inputs = {net.name: [t.name for t in components[net.name].inputs] for net in nets}
        # those with a batch axis: halved for a ControlNet that runs on the prompt's half alone
        self.batched = {
            net.name: {t.name for t in components[net.name].inputs if t.shape and t.shape[0] == "batch_size"}
            for net in nets
        }
        self.timings = timings.setdefault("controlnet", [])
        self._encode, self._vae, self._do_cfg = encode, vae, do_cfg
        self._to_encode = [net for net in nets if net.latent_shift is not None]  # SD3's, until the first step

    def _encode_images(self) -> None:
        """SD3, FLUX: every ControlNet's image to latents, once, in the ControlNets' order."""
        shift, scaling = self._vae
        for net in self._to_encode:
            latents = self._encode(net.image.astype(np.float32))  # (sample - the VAE's shift) * scaling
            # this ControlNet's own shift (0 for InstantX's), as StableDiffusion3ControlNetPipeline
            latents = latents + np.float32((shift - net.latent_shift) * scaling)
            both = self._do_cfg and not net.prompt_only
            net.image = np.concatenate([latents, latents]) if both else latents
        self._to_encode = []

    def residuals(self, step: int, total: int, feeds: dict, run: Callable) -> dict[str, np.ndarray]:
        """The residual feeds for this step, or {} when no ControlNet is active (the denoiser keeps its zeros).
        `run(component, **feeds)` runs a graph (cancellable)."""
        self._encode_images()
        summed = None
        for net in self.nets:
            scale = net.scale_at(step, total)
            if scale == 0.0:  # diffusers still runs it, and multiplies its residuals by 0
                continue
            graph_feeds = {name: feeds[name] for name in self.inputs[net.name] if name != "controlnet_cond"}
            halves = self._do_cfg and net.prompt_only
            if halves:  # the prompt's half (the negative batch comes first)
                batched = self.batched[net.name]
                graph_feeds = {k: v[len(v) // 2 :] if k in batched else v for k, v in graph_feeds.items()}
            t0 = time.perf_counter()
            outputs = run(net.component, controlnet_cond=net.image, **graph_feeds)
            self.timings.append(time.perf_counter() - t0)
            if halves:
                outputs = [np.concatenate([o, o]) for o in outputs]
            scaled = [o.astype(np.float32) * np.float32(scale) for o in outputs]
            summed = scaled if summed is None else [a + b for a, b in zip(summed, scaled)]
        if summed is None:
            return {}
        return {name: value for name, value in zip(self.residual_names, summed) if name in self.taken}
