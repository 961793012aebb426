"""SD3 / SD3.5's denoiser: the MMDiT transformer over 16-channel latents, conditioned as diffusers'
StableDiffusion3Pipeline.encode_prompt does (clip_skip None).

The joint text sequence is both CLIPs' penultimate hidden states side by side, zero-padded to the transformer's
joint width, followed by T5's last hidden state (max_sequence_length tokens; zeros when the bundle was exported
without T5, as diffusers with text_encoder_3=None); the pooled text is both CLIPs' projected pooled outputs side
by side. The timestep goes in once per batch row.
"""

from __future__ import annotations

import time

import numpy as np

from ..conditioning import run_encoder, text_encoders
from ..errors import InputError
from ..tokenizer import PromptTokenizer

MAX_SEQUENCE_LENGTH = 512  # StableDiffusion3Pipeline refuses more T5 tokens


class SD3Conditioner:
    """Prompts to the transformer's encoder_hidden_states and pooled_projections."""

    def __init__(self, bundle, sessions):
        c = bundle.manifest.conditioning
        encoders = text_encoders(bundle)
        self.clips = [e for e in encoders if e.pooled]  # CLIP-L, CLIP-G: hidden states and pooled text
        self.t5 = next((e for e in encoders if not e.pooled), None)  # None: exported with --no-t5
        self.joint_width = int(c["joint_attention_dim"])
        self.max_sequence_length = int(c["max_sequence_length"])
        self._bundle, self.sessions = bundle, sessions
        self._t5_tokenizers = {} if self.t5 is None else {self.t5.tokenizer.max_length: self.t5.tokenizer}

    @property
    def components(self) -> list[str]:
        return [e.component for e in (*self.clips, *([self.t5] if self.t5 else []))]

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first CLIP's tokenizer (prompt length checks, token counts)."""
        return self.clips[0].tokenizer

    def _t5_tokenizer(self, length: int) -> PromptTokenizer:
        """T5's tokenizer padding to `length` tokens (a call's max_sequence_length), made once per length."""
        if length not in self._t5_tokenizers:
            entry = next(
                e["tokenizer"] for e in self._bundle.manifest.text_encoders if e["component"] == "text_encoder_3"
            )
            self._t5_tokenizers[length] = PromptTokenizer(self._bundle.tokenizer_file(entry), length, entry["pad_id"])
        return self._t5_tokenizers[length]

    def _run(self, enc, tokenizer, prompts, timings) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        ids = tokenizer(prompts)
        t1 = time.perf_counter()
        outputs = run_encoder(enc, self.sessions.get(enc.component), ids)
        timings["tokenize"] = timings.get("tokenize", 0.0) + t1 - t0
        timings["text_encoder"] = timings.get("text_encoder", 0.0) + time.perf_counter() - t1
        return outputs

    def encode(self, prompts: list[str], max_sequence_length: int, timings: dict) -> tuple[np.ndarray, np.ndarray]:
        """(joint text (B, clip tokens + max_sequence_length, joint width), pooled (B, P)) for `prompts`."""
        hidden, pooled = [], []
        for enc in self.clips:
            outputs = self._run(enc, enc.tokenizer, prompts, timings)
            hidden.append(outputs[enc.output].astype(np.float32))
            pooled.append(outputs[enc.pooled].astype(np.float32))
        clip = np.concatenate(hidden, axis=-1)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, self.joint_width - clip.shape[-1])))
        if self.t5 is None:
            t5 = np.zeros((len(prompts), max_sequence_length, self.joint_width), dtype=np.float32)
        else:
            outputs = self._run(self.t5, self._t5_tokenizer(max_sequence_length), prompts, timings)
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
        return {"encoder_hidden_states": cond, "pooled_projections": pooled}


class SD3Denoiser:
    component = "transformer"
    guidance_embedded = False
    image_tasks = False  # image-to-image and inpainting are not wired for SD3 bundles yet

    def __init__(self, bundle, sessions):
        self.text = SD3Conditioner(bundle, sessions)
        spec = bundle.manifest.components["transformer"]
        self.in_channels = next(t.shape[1] for t in spec.inputs if t.name == "hidden_states")

    def condition(
        self, prompts, negatives, do_cfg, repeat, height, width, guidance, timings, max_sequence_length=None
    ) -> dict[str, np.ndarray]:
        length = self.text.max_sequence_length if max_sequence_length is None else max_sequence_length
        if not isinstance(length, (int, np.integer)) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
            raise InputError("max_sequence_length", limit=MAX_SEQUENCE_LENGTH, value=length)
        return self.text(prompts, negatives, do_cfg, repeat, int(length), timings)

    def feeds(self, model_in, timestep, fixed) -> dict[str, np.ndarray]:
        # one timestep per batch row, as StableDiffusion3Pipeline's t.expand(batch)
        return {"hidden_states": model_in, "timestep": np.full((model_in.shape[0],), timestep, np.float32), **fixed}
