"""SD3 / SD3.5's denoiser: the MMDiT transformer over 16-channel latents, conditioned as diffusers'
StableDiffusion3Pipeline.encode_prompt does (clip_skip None).

The joint text sequence is both CLIPs' penultimate hidden states side by side, zero-padded to the transformer's
joint width, followed by T5's last hidden state (max_sequence_length tokens; zeros when the bundle was exported
without T5, as diffusers with text_encoder_3=None); the pooled text is both CLIPs' projected pooled outputs side
by side. The timestep goes in once per batch row. A transformer exported without T5 takes its zeros as one token
counted max_sequence_length times (`text_log_counts`, export/counted_text.py): the same output for less work.
"""

from __future__ import annotations

import numpy as np

from ..conditioning import LengthTokenizers, prompts_for, run_timed, sequence_length, text_encoders
from ..control import taken_residuals, zero_residuals
from ..errors import BundleError
from ..tokenizer import PromptTokenizer
from .base import DenoiserBase, flow_start_index, per_row

# the transformer input that counts repeated text tokens: per token, the log of how many equal tokens it stands for
TEXT_LOG_COUNTS = "text_log_counts"


def counts_text(transformer_spec) -> bool:
    """Whether a transformer graph takes T5's zero tokens as one, counted (by its declared inputs)."""
    return any(t.name == TEXT_LOG_COUNTS for t in transformer_spec.inputs)


def text_log_counts(batch: int, tokens: int, zero_tokens: int) -> np.ndarray:
    """(batch, tokens) log counts of a counted joint text: 0 for each CLIP token, log(zero_tokens) for the last,
    the zero token that stands for T5's."""
    counts = np.zeros((batch, tokens), dtype=np.float32)
    counts[:, -1] = np.log(zero_tokens)
    return counts


class SD3Conditioner:
    """Prompts to the transformer's encoder_hidden_states and pooled_projections."""

    def __init__(self, bundle, sessions):
        c = bundle.manifest.conditioning
        encoders = text_encoders(bundle)
        self.clips = [e for e in encoders if e.pooled]  # CLIP-L, CLIP-G: hidden states and pooled text
        self.t5 = next((e for e in encoders if not e.pooled), None)  # None: exported with --no-t5
        self.joint_width = int(c["joint_attention_dim"])
        self.max_sequence_length = int(c["max_sequence_length"])
        self.sessions = sessions
        self._t5_tokenizer = None if self.t5 is None else LengthTokenizers(bundle, self.t5)
        self.counted = counts_text(bundle.manifest.components["transformer"])  # zero T5 tokens as one
        if self.counted and self.t5 is not None:  # T5's states differ token by token: none may be counted
            detail = f"it takes {TEXT_LOG_COUNTS} (T5's zero tokens counted) but the bundle has a T5 encoder"
            raise BundleError("graph_mismatch", path=bundle.path, component="transformer", detail=detail)

    @property
    def components(self) -> list[str]:
        return [e.component for e in (*self.clips, *([self.t5] if self.t5 else []))]

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first CLIP's tokenizer (prompt length checks, token counts)."""
        return self.clips[0].tokenizer

    def encode(self, prompts: list[str], max_sequence_length: int, timings: dict) -> tuple[np.ndarray, np.ndarray]:
        """(joint text (B, clip tokens + max_sequence_length, joint width), pooled (B, P)) for `prompts`; a counted
        transformer's joint text has one zero token in place of T5's."""
        hidden, pooled = [], []
        for enc in self.clips:
            text = prompts_for(prompts, enc.component)  # prompt_2: CLIP-G's
            outputs = run_timed(enc, enc.tokenizer, self.sessions.get(enc.component), text, timings)
            hidden.append(outputs[enc.output].astype(np.float32))
            pooled.append(outputs[enc.pooled].astype(np.float32))
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.joint_width - clip.shape[-1])))
        if self.t5 is None:
            zeros = 1 if self.counted else max_sequence_length
            t5 = np.zeros((len(prompts), zeros, self.joint_width), dtype=np.float32)
        else:
            tokenizer = self._t5_tokenizer(max_sequence_length)
            text = prompts_for(prompts, self.t5.component)  # prompt_3
            outputs = run_timed(self.t5, tokenizer, self.sessions.get(self.t5.component), text, timings)
            t5 = outputs[self.t5.output].astype(np.float32)
        return np.concatenate([clip, t5], axis=1), np.concatenate(pooled, axis=-1)

    def __call__(self, prompts, negatives, do_cfg, repeat, max_sequence_length, timings) -> dict[str, np.ndarray]:
        cond, pooled = self.encode(prompts, max_sequence_length, timings)
        if do_cfg:  # no zeroed negative in SD3: "" (or the given negatives) through every encoder
            uncond, uncond_pooled = self.encode(negatives or [""] * len(prompts), max_sequence_length, timings)
            cond = np.concatenate([np.repeat(uncond, repeat, 0), np.repeat(cond, repeat, 0)])
            pooled = np.concatenate([np.repeat(uncond_pooled, repeat, 0), np.repeat(pooled, repeat, 0)])
        else:
            cond, pooled = np.repeat(cond, repeat, 0), np.repeat(pooled, repeat, 0)
        feeds = {"encoder_hidden_states": cond, "pooled_projections": pooled}
        if self.counted:  # the CLIP tokens once each, the zero token for max_sequence_length of them
            feeds[TEXT_LOG_COUNTS] = text_log_counts(cond.shape[0], cond.shape[1], max_sequence_length)
        return feeds


class SD3Denoiser(DenoiserBase):
    component = "transformer"
    guidance_embedded = False
    # StableDiffusion3Img2ImgPipeline; inpainting (StableDiffusion3InpaintPipeline) is not wired yet
    image_tasks = ("img2img",)

    def __init__(self, bundle, sessions):
        self.text = SD3Conditioner(bundle, sessions)
        spec = bundle.manifest.components["transformer"]
        self.in_channels = next(t.shape[1] for t in spec.inputs if t.name == "hidden_states")
        self.residuals = taken_residuals(spec)  # a bundle with ControlNets: the block samples it takes

    def condition(
        self, prompts, negatives, do_cfg, repeat, height, width, guidance, timings, max_sequence_length=None
    ) -> dict[str, np.ndarray]:
        length = sequence_length(max_sequence_length, self.text.max_sequence_length)
        return self.text(prompts, negatives, do_cfg, repeat, length, timings)

    def feeds(self, model_in, timestep, fixed) -> dict[str, np.ndarray]:
        # one timestep per batch row, as StableDiffusion3Pipeline's t.expand(batch)
        feeds = {"hidden_states": model_in, "timestep": per_row(model_in, timestep), **fixed}
        if self.residuals:  # zeros: no control (the pipeline puts active ControlNets' block samples in their place)
            feeds.update(zero_residuals(self.residuals, model_in))
        return feeds

    def start_index(self, steps: int, strength: float) -> int:
        return flow_start_index(steps, strength)
