"""The UNet families' denoiser (SD 1.x / 2.x, SDXL, LCM, Turbo): text feeds from the TextConditioner, the
timestep as one scalar for the whole batch, and LCM's guidance as an embedding."""

from __future__ import annotations

import numpy as np

from ..conditioning import TextConditioner
from ..control import residual_inputs, zero_residuals
from ..ip_adapter import idle_feeds
from .base import DenoiserBase


def guidance_embedding(w: np.ndarray, dim: int) -> np.ndarray:
    """LCM's guidance-scale embedding (sinusoidal, as diffusers' get_guidance_scale_embedding)."""
    w = w.astype(np.float32) * 1000.0
    half = dim // 2
    freqs = np.exp(np.arange(half, dtype=np.float32) * -(np.log(np.float32(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = np.concatenate([np.sin(emb), np.cos(emb)], axis=1)
    if dim % 2 == 1:
        emb = np.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(np.float32)


class UNetDenoiser(DenoiserBase):
    component = "unet"
    image_tasks = ("img2img", "inpaint")

    def __init__(self, bundle, sessions):
        m = bundle.manifest
        self.text = TextConditioner(bundle, sessions)
        self.in_channels = next(t.shape[1] for t in m.components["unet"].inputs if t.name == "sample")
        self.embedding_dim = m.guidance_embedding_dim
        self.guidance_embedded = self.embedding_dim is not None
        self.residuals = residual_inputs(m.components["unet"])  # a bundle with ControlNets: their residual inputs
        self.ip_adapter = m.ip_adapter  # a bundle with an IP-Adapter: the UNet takes image embeddings and a scale

    def condition(
        self, prompts, negatives, do_cfg, repeat, height, width, guidance, timings, max_sequence_length=None
    ) -> dict[str, np.ndarray]:
        fixed = self.text(prompts, negatives, do_cfg, repeat, height, width, timings)
        if self.guidance_embedded:  # LCM: an embedding of (w - 1), no second batch
            w = np.full((len(prompts) * repeat,), guidance - 1.0, dtype=np.float32)
            fixed["timestep_cond"] = guidance_embedding(w, self.embedding_dim)
        if self.ip_adapter:  # no reference image unless the pipeline puts one in their place
            fixed.update(idle_feeds(self.ip_adapter, len(fixed["encoder_hidden_states"])))
        return fixed

    def feeds(self, model_in, timestep, fixed) -> dict[str, np.ndarray]:
        feeds = {"sample": model_in, "timestep": np.array(timestep, dtype=np.float32), **fixed}
        if self.residuals:  # zeros: no control (the pipeline puts active ControlNets' residuals in their place)
            feeds.update(zero_residuals(self.residuals, model_in))
        return feeds
