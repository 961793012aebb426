"""ControlNets at run time, as diffusers' StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline.

A bundle exported with `--controlnet` holds each ControlNet as a graph of its own, and a UNet that takes their
residuals as inputs (zeros when a call has no control: UNetDenoiser.feeds). Per step, each active ControlNet runs on
the UNet's own feeds plus its control image; its residuals are scaled by its `controlnet_conditioning_scale` and
summed over the ControlNets (MultiControlNetModel), then replace the zeros.

    pipe(prompt, control_image=edges)                                    # a bundle with one ControlNet
    pipe(prompt, control_image={"canny": edges, "depth": depth},         # several, by name
         controlnet_conditioning_scale={"canny": 1.0, "depth": 0.5}, control_guidance_end=0.8)

Control images are preprocessed as diffusers' control image processor does: RGB, resized to the output size with
Lanczos (any size is accepted), scaled to [0, 1] (not [-1, 1]), repeated for every image of the batch and again for
the unconditional half of classifier-free guidance.
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
    """The UNet's residual inputs as the manifest records them ({"name", "level", "channels"}, down ones then the
    mid one), or [] for a UNet without them."""
    return list(unet_spec.attributes.get("controlnet_residuals") or [])


def zero_residuals(residuals: list[dict], sample: np.ndarray) -> dict[str, np.ndarray]:
    """Zeros for each residual input at `sample`'s batch and size: the UNet then runs as without ControlNets."""
    batch, _, h, w = sample.shape
    return {
        r["name"]: np.zeros((batch, r["channels"], _side(h, r["level"]), _side(w, r["level"])), np.float32)
        for r in residuals
    }


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

    def scale_at(self, step: int, total: int) -> float:
        """The scale this step, as diffusers' controlnet_keep: 0 outside [start, end] of the steps."""
        keep = 1.0 - float(step / total < self.start or (step + 1) / total > self.end)
        return self.scale * keep


class ControlNets:
    """A bundle's ControlNets (by name, in the manifest's order) and the UNet residual inputs they feed."""

    def __init__(self, manifest, bundle_path):
        self.path = bundle_path
        self.entries = {c["name"]: c for c in manifest.controlnets}
        self.residuals = residual_inputs(manifest.components[manifest.denoiser]) if self.entries else []
        self.components = {name: manifest.components[c["component"]] for name, c in self.entries.items()}

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def prepare(
        self, control_image, scale, start, end, height: int, width: int, batch: int, do_cfg: bool, timings: dict
    ) -> "ControlCall | None":
        """One call's ControlNets with their images, scales and guidance windows; None without control_image."""
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
            try:
                image = prepare_control_image(images[name], height, width, batch, do_cfg, channels)
            except (OSError, ValueError, TypeError) as exc:
                raise InputError("controlnet_image", name=name, detail=exc) from None
            nets.append(_Net(name, self.entries[name]["component"], image, weight, s, e))
        return ControlCall(nets, self.residuals, self.components, timings)

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
    """One call's active ControlNets: per step, the summed, scaled residuals the UNet takes."""

    def __init__(self, nets: list[_Net], residuals: list[dict], components: dict, timings: dict):
        self.nets = nets
        self.residual_names = [r["name"] for r in residuals]
        # each graph takes the UNet's feeds it names, besides its control image
        self.inputs = {net.name: [t.name for t in components[net.name].inputs] for net in nets}
        self.timings = timings.setdefault("controlnet", [])

    def residuals(self, step: int, total: int, feeds: dict, run: Callable) -> dict[str, np.ndarray]:
        """The residual feeds for this step, or {} when no ControlNet is active (the UNet keeps its zeros).
        `run(component, **feeds)` runs a graph (cancellable)."""
        summed = None
        for net in self.nets:
            scale = net.scale_at(step, total)
            if scale == 0.0:  # diffusers still runs it, and multiplies its residuals by 0
                continue
            graph_feeds = {name: feeds[name] for name in self.inputs[net.name] if name != "controlnet_cond"}
            t0 = time.perf_counter()
            outputs = run(net.component, controlnet_cond=net.image, **graph_feeds)
            self.timings.append(time.perf_counter() - t0)
            scaled = [o.astype(np.float32) * np.float32(scale) for o in outputs]
            summed = scaled if summed is None else [a + b for a, b in zip(summed, scaled)]
        return {} if summed is None else dict(zip(self.residual_names, summed))
