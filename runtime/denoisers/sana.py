"""SANA's and SANA-Sprint's denoiser: the linear-attention DiT over DC-AE latents, conditioned as diffusers'
SanaPipeline / SanaSprintPipeline do (clean_caption False).

Text (encode_prompt): prompts lower-cased and stripped; each prompt follows the complex-human-instruction prefix the
manifest records and is padded to the prefix's tokens + max_sequence_length - 2; Gemma-2 runs on the tokens with their
attention mask, and the first token and the last max_sequence_length - 1 are kept, hidden states and mask alike (the
mask goes to the transformer as encoder_attention_mask). Bundles store the instruction's keys and values
(export/gemma_prefix.py): Gemma-2 then runs on the prompt's own tokens only, up to the longest prompt's last; the
padding, which the transformer masks, gets zeros. Negative prompts (SANA's CFG) take no prefix and
max_sequence_length tokens. Timestep: SANA's is the sampler's times timestep_scale, once per batch row; Sprint's is
SCM's flow time (the sampler's model_timestep, unscaled, as SanaSprintPipeline), with guidance_scale x
guidance_embeds_scale as the transformer's guidance input and no unconditional batch. Image-to-image: Sprint's, as
SanaSprintImg2ImgPipeline (DC-AE's latent noised to the first angle by the SCM sampler, steps cut as SD3's); SANA
itself has no image-to-image pipeline in diffusers.
"""

from __future__ import annotations

import time

import numpy as np

from ..conditioning import LengthTokenizers, run_encoder, run_timed, sequence_length, text_encoders
from ..errors import InputError
from ..tokenizer import PromptTokenizer
from .base import DenoiserBase, flow_start_index, per_row


def preprocess(prompt: str) -> str:
    """SanaPipeline._text_preprocessing without caption cleaning."""
    return prompt.lower().strip()


class SanaConditioner:
    """Prompts to the transformer's encoder_hidden_states and encoder_attention_mask."""

    def __init__(self, bundle, sessions):
        c = bundle.manifest.conditioning
        self.gemma = text_encoders(bundle)[0]
        self.max_sequence_length = int(c["max_sequence_length"])
        self.instruction = c.get("instruction", "")
        self.sessions = sessions
        self._tokenizers = LengthTokenizers(bundle, self.gemma)
        # as SanaPipeline counts it: len(tokenizer.encode(instruction)), its start token included
        self._instruction_tokens = self.gemma.tokenizer.count(self.instruction) if self.instruction else 0
        inputs = {t.name: t.shape for t in bundle.manifest.components[self.gemma.component].inputs}
        # bundles made before the cached prefix run Gemma-2 over every token
        self._prefixed = "prefix_keys" in inputs
        self._empty = np.zeros([0 if isinstance(d, str) else d for d in inputs.get("prefix_keys", [])], np.float32)
        entry = c.get("prefix")
        self._prefix_file = bundle.file(entry["file"]) if entry else None
        self._prefix = None  # read on first use

    @property
    def components(self) -> list[str]:
        return [self.gemma.component]

    @property
    def tokenizer(self) -> PromptTokenizer:
        return self.gemma.tokenizer

    def encode(self, prompts: list[str], length: int, instruct: bool, timings: dict):
        """(hidden states (B, length, D), mask (B, length)) for `prompts`, with the instruction prefix or not."""
        prompts, total = self._instructed(prompts, length, instruct)
        session = self.sessions.get(self.gemma.component)
        if self._prefixed:
            hidden, mask = self._run_after_prefix(session, prompts, total, instruct, timings)
        else:
            outputs = run_timed(self.gemma, self._tokenizers(total), session, prompts, timings, mask=True)
            hidden, mask = outputs[self.gemma.output].astype(np.float32), outputs["attention_mask"]
        # SanaPipeline.encode_prompt's select_index: [0] + the last length - 1 (all of them without the prefix)
        keep = [0, *range(total - length + 1, total)]
        return hidden[:, keep], mask[:, keep]

    def _instructed(self, prompts: list[str], length: int, instruct: bool) -> tuple[list[str], int]:
        """The prompts as Gemma-2 reads them (after the instruction, when `instruct`) and their padded length."""
        prompts = [preprocess(p) for p in prompts]
        if instruct and self.instruction:
            return [self.instruction + p for p in prompts], self._instruction_tokens + length - 2
        return prompts, length

    def _columns(self, ids: np.ndarray, mask: np.ndarray, instruct: bool):
        """(the stored prefix or None, the first and past-the-last token Gemma-2 runs on)."""
        prefix = self._cached_prefix(ids) if instruct else None
        start = len(prefix["ids"]) if prefix else 0
        return prefix, start, max(int(mask.sum(axis=1).max()), start + 1)  # right-padded: the rest is padding

    def prompt_tokens(self, prompt: str, length: int) -> tuple[int, int]:
        """(the stored prefix's tokens, the tokens Gemma-2 runs on after them) for `prompt`, as encode runs it:
        what a compute count of the text encoder's call needs."""
        prompts, total = self._instructed([prompt], length, True)
        if not self._prefixed:  # Gemma-2 over every token
            return 0, total
        ids, mask = self._tokenizers(total).encode(prompts)
        _, start, used = self._columns(ids, mask, True)
        return start, used - start

    def _cached_prefix(self, ids: np.ndarray):
        """The stored prefix when every row's tokens begin with its ids, else None (Gemma-2 then runs from the
        first token: a prompt whose first characters merged with the instruction's last token)."""
        if self._prefix_file is None:
            return None
        if self._prefix is None:
            with np.load(self._prefix_file, allow_pickle=False) as data:  # data only: never pickled objects
                self._prefix = {k: data[k] for k in data.files}
        cached = self._prefix["ids"]
        if ids.shape[1] <= len(cached) or not (ids[:, : len(cached)] == cached).all():
            return None
        return self._prefix

    def _run_after_prefix(self, session, prompts, total, instruct, timings):
        """Gemma-2 on each prompt's tokens after the stored prefix (all of them without one), up to the longest
        prompt's last token; (hidden states (B, total, D) with zeros where not computed, mask (B, total))."""
        t0 = time.perf_counter()
        ids, mask = self._tokenizers(total).encode(prompts)
        t1 = time.perf_counter()
        prefix, start, used = self._columns(ids, mask, instruct)
        past = (prefix["keys"], prefix["values"]) if prefix else (self._empty, self._empty)
        extra = {"prefix_keys": past[0], "prefix_values": past[1]}
        out = run_encoder(self.gemma, session, ids[:, start:used], mask[:, :used], extra)[self.gemma.output]
        hidden = np.zeros((len(prompts), total, out.shape[-1]), np.float32)
        hidden[:, start:used] = out
        if prefix:  # the instruction's first token, which SanaPipeline keeps
            hidden[:, 0] = prefix["first_hidden_state"]
        timings["tokenize"] = timings.get("tokenize", 0.0) + t1 - t0
        timings["text_encoder"] = timings.get("text_encoder", 0.0) + time.perf_counter() - t1
        return hidden, mask

    def __call__(self, prompts, negatives, do_cfg, repeat, length, timings) -> dict[str, np.ndarray]:
        cond, mask = self.encode(prompts, length, True, timings)
        cond, mask = np.repeat(cond, repeat, 0), np.repeat(mask, repeat, 0)
        if do_cfg:  # SanaPipeline's default negative prompt is "", without the instruction prefix
            uncond, uncond_mask = self.encode(negatives or [""] * len(prompts), length, False, timings)
            cond = np.concatenate([np.repeat(uncond, repeat, 0), cond])
            mask = np.concatenate([np.repeat(uncond_mask, repeat, 0), mask])
        return {"encoder_hidden_states": cond, "encoder_attention_mask": mask}


class SanaDenoiser(DenoiserBase):
    component = "transformer"

    def __init__(self, bundle, sessions):
        m = bundle.manifest
        c = m.conditioning
        self.text = SanaConditioner(bundle, sessions)
        self.family = m.family
        spec = m.components["transformer"]
        self.in_channels = next(t.shape[1] for t in spec.inputs if t.name == "hidden_states")
        # Sprint: guidance is the transformer's input, never an unconditional batch
        self.guidance_embedded = bool(c.get("guidance_embedding"))
        # Sprint: SanaSprintImg2ImgPipeline (needs the DC-AE encoder: older bundles lack it and say so)
        self.image_tasks = ("img2img",) if self.guidance_embedded else ()
        self.guidance_scale = np.float32(c.get("guidance_embeds_scale", 0.1))
        # SanaSprintPipeline feeds SCM's flow time as it is; SanaPipeline scales its timesteps
        self.timestep_scale = np.float32(1.0 if self.guidance_embedded else c.get("timestep_scale", 1.0))

    def condition(
        self, prompts, negatives, do_cfg, repeat, height, width, guidance, timings, max_sequence_length=None
    ) -> dict[str, np.ndarray]:
        if negatives is not None and self.guidance_embedded:
            raise InputError("negative_prompt_embedded", family=self.family)
        length = sequence_length(max_sequence_length, self.text.max_sequence_length)
        fixed = self.text(prompts, negatives, do_cfg, repeat, length, timings)
        if self.guidance_embedded:  # float32 as the pipeline's guidance tensor, then x guidance_embeds_scale
            fixed["guidance"] = per_row(fixed["encoder_hidden_states"], np.float32(guidance) * self.guidance_scale)
        return fixed

    def feeds(self, model_in, timestep, fixed) -> dict[str, np.ndarray]:
        return {
            "hidden_states": model_in,
            "timestep": per_row(model_in, np.float32(timestep) * self.timestep_scale),
            **fixed,
        }

    def start_index(self, steps: int, strength: float) -> int:
        # Sprint's (SANA and PixArt take no image): SanaSprintImg2ImgPipeline.get_timesteps is SD3's
        return flow_start_index(steps, strength)
