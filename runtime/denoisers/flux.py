"""FLUX.1's denoiser (schnell, dev): the MMDiT transformer over 16-channel latents packed into tokens, conditioned
as diffusers' FluxPipeline does.

Text: CLIP-L's pooled output is the pooled text, T5's last hidden state (max_sequence_length tokens) the text
tokens (FluxPipeline.encode_prompt). Latents: the sampling loop runs on FluxPipeline's packed latents, each token
a 2x2 patch of latent cells (_pack_latents), unpacked for the VAE; rotary position ids are (0, row, col) per image
token and zeros per text token. Timesteps: FluxPipeline's sigmas, linspace(1, 1/steps, steps), shifted as the
scheduler config says (dev: by mu from the image's token count), fed as t / 1000 once per batch row. Guidance:
dev's transformer embeds guidance_scale; schnell has no guidance. Neither runs an unconditional batch unless asked
for FluxPipeline's true CFG (true_cfg_scale > 1 with a negative prompt): then the negative prompt's conditioning
goes first in the batch, as CFG's does, and the embedded guidance stays.
"""

from __future__ import annotations

import inspect

import numpy as np

from ..conditioning import LengthTokenizers, prompts_for, run_timed, sequence_length, text_encoders
from ..control import taken_residuals, zero_residuals
from ..tokenizer import PromptTokenizer
from .base import flow_start_index, per_row


def pack_latents(grid: np.ndarray, packing: int) -> np.ndarray:
    """(B, C, h, w) -> (B, h/p * w/p, C * p * p), as FluxPipeline._pack_latents (p = 2)."""
    b, c, h, w = grid.shape
    patches = grid.reshape(b, c, h // packing, packing, w // packing, packing).transpose(0, 2, 4, 1, 3, 5)
    return np.ascontiguousarray(patches.reshape(b, (h // packing) * (w // packing), c * packing * packing))


def unpack_latents(latents: np.ndarray, rows: int, cols: int, packing: int) -> np.ndarray:
    """(B, rows * cols, C * p * p) -> (B, C, rows * p, cols * p), as FluxPipeline._unpack_latents."""
    b, _, width = latents.shape
    c = width // (packing * packing)
    grid = latents.reshape(b, rows, cols, c, packing, packing).transpose(0, 3, 1, 4, 2, 5)
    return np.ascontiguousarray(grid.reshape(b, c, rows * packing, cols * packing))


def image_ids(rows: int, cols: int) -> np.ndarray:
    """(rows * cols, 3) position ids (0, row, col), as FluxPipeline._prepare_latent_image_ids."""
    ids = np.zeros((rows, cols, 3), dtype=np.float32)
    ids[..., 1] = np.arange(rows, dtype=np.float32)[:, None]
    ids[..., 2] = np.arange(cols, dtype=np.float32)[None, :]
    return ids.reshape(rows * cols, 3)


class FluxConditioner:
    """Prompts to the transformer's encoder_hidden_states (T5) and pooled_projections (CLIP-L)."""

    def __init__(self, bundle, sessions):
        encoders = text_encoders(bundle)
        self.clip = next(e for e in encoders if e.pooled)  # CLIP-L: only its pooled output is used
        self.t5 = next(e for e in encoders if not e.pooled)  # FLUX's text_encoder_2
        self.max_sequence_length = int(bundle.manifest.conditioning["max_sequence_length"])
        self.sessions = sessions
        self._t5_tokenizer = LengthTokenizers(bundle, self.t5)

    @property
    def components(self) -> list[str]:
        return [self.clip.component, self.t5.component]

    @property
    def tokenizer(self) -> PromptTokenizer:
        """CLIP's tokenizer (prompt length checks, token counts)."""
        return self.clip.tokenizer

    def __call__(self, prompts: list[str], repeat: int, max_sequence_length: int, timings: dict) -> dict:
        clip = run_timed(self.clip, self.clip.tokenizer, self.sessions.get(self.clip.component), prompts, timings)
        t5_tokenizer = self._t5_tokenizer(max_sequence_length)
        text = prompts_for(prompts, self.t5.component)  # prompt_2: T5's, as FluxPipeline
        t5 = run_timed(self.t5, t5_tokenizer, self.sessions.get(self.t5.component), text, timings)
        return {
            "encoder_hidden_states": np.repeat(t5[self.t5.output].astype(np.float32), repeat, 0),
            "pooled_projections": np.repeat(clip[self.clip.pooled].astype(np.float32), repeat, 0),
        }


class FluxDenoiser:
    component = "transformer"
    # no unconditional batch for guidance_scale: dev's guidance is an input of the transformer, schnell has none
    guidance_embedded = True
    true_cfg = True  # FluxPipeline's true_cfg_scale: a negative-prompt batch besides the embedded guidance
    # FluxImg2ImgPipeline; inpainting (FluxInpaintPipeline) is not wired yet
    image_tasks = ("img2img",)

    def __init__(self, bundle, sessions):
        m = bundle.manifest
        self.text = FluxConditioner(bundle, sessions)
        self.packing = int(m.latent_packing)
        self.vae_scale = int(m.vae_scale_factor)
        self.embeds_guidance = bool(m.conditioning.get("guidance_embedding"))
        self.in_channels = m.latent_channels  # the latent grid's (the graph's tokens are packing^2 times wider)
        self.residuals = taken_residuals(m.components["transformer"])  # with ControlNets: the block samples it takes

    def _tokens(self, height: int, width: int) -> tuple[int, int]:
        """The packed token grid (rows, cols) of an image of height x width pixels."""
        side = self.vae_scale * self.packing
        return height // side, width // side

    def condition(
        self, prompts, negatives, do_cfg, repeat, height, width, guidance, timings, max_sequence_length=None
    ) -> dict[str, np.ndarray]:
        # negatives without true CFG are ignored, as FluxPipeline ignores them at true_cfg_scale 1
        length = sequence_length(max_sequence_length, self.text.max_sequence_length)
        fixed = self.text(prompts, repeat, length, timings)
        if do_cfg:  # true CFG: the negative prompt's half first, as CFG's unconditional half
            negative = self.text(negatives, repeat, length, timings)
            fixed = {name: np.concatenate([negative[name], fixed[name]]) for name in fixed}
        rows, cols = self._tokens(height, width)
        fixed["img_ids"] = image_ids(rows, cols)
        fixed["txt_ids"] = np.zeros((length, 3), dtype=np.float32)
        if self.embeds_guidance:  # the scale itself: the transformer multiplies it by 1000
            fixed["guidance"] = np.full((len(fixed["pooled_projections"]),), guidance, dtype=np.float32)
        return fixed

    def feeds(self, model_in, timestep, fixed) -> dict[str, np.ndarray]:
        # FluxPipeline feeds t / 1000 per batch row (the transformer scales it back)
        t = np.float32(timestep) / np.float32(1000)
        feeds = {"hidden_states": model_in, "timestep": per_row(model_in, t), **fixed}
        if self.residuals:  # zeros: no control (the pipeline puts active ControlNets' block samples in their place)
            feeds.update(zero_residuals(self.residuals, model_in))
        return feeds

    def prediction(self, output: np.ndarray) -> np.ndarray:
        return output

    def latent_shape(self, grid: tuple[int, ...]) -> tuple[int, ...]:
        b, c, h, w = grid
        return (b, (h // self.packing) * (w // self.packing), c * self.packing**2)

    def pack(self, grid: np.ndarray) -> np.ndarray:
        return pack_latents(grid, self.packing)

    def unpack(self, latents: np.ndarray, height: int, width: int) -> np.ndarray:
        return unpack_latents(latents, *self._tokens(height, width), self.packing)

    def schedule(self, sampler, steps: int, height: int, width: int) -> dict:
        """FluxPipeline's timesteps: sigmas linspace(1, 1/steps, steps) (not for samplers on flow sigmas of their
        own, as FluxPipeline) and mu from the image's token count (used where the config shifts dynamically)."""
        accepted = inspect.signature(sampler.set_timesteps).parameters
        options = {}
        if "mu" in accepted:
            rows, cols = self._tokens(height, width)
            options["mu"] = sampler.config.mu_for(rows * cols)
        if "sigmas" in accepted and not sampler.config.use_flow_sigmas:
            options["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        return options

    def start_index(self, steps: int, strength: float) -> int:
        return flow_start_index(steps, strength)
