"""Prompts to the UNet's conditioning, driven by the manifest's `conditioning` entry; the helpers the transformer
denoisers (runtime/denoisers) share: timed encoder runs, T5 tokenizers per max_sequence_length.

SD 1.x / 2.x: one CLIP text encoder's last hidden state. SDXL (as diffusers' StableDiffusionXLPipeline
with clip_skip None): both encoders' penultimate hidden states side by side, the second encoder's
projected pooled output as `text_embeds`, and `time_ids` = (original size, crop top-left, target size).
One code path for both, so the pipeline has no SDXL variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .errors import InputError, NaNOutputError
from .tokenizer import PromptTokenizer


class Prompts(list):
    """A batch's prompts (the list itself: every encoder's unless told otherwise) and, per text encoder component,
    the prompts that encoder takes instead: diffusers' prompt_2 / prompt_3 (SDXL's second CLIP, SD3's CLIP-G and
    T5, FLUX's T5)."""

    def __init__(self, prompts, by_encoder: dict[str, list[str]] | None = None, main_given: bool = True):
        super().__init__(prompts)
        self.by_encoder = dict(by_encoder or {})
        self.main_given = main_given  # False: negatives with only an encoder's own given (SDXL then zeroes them)


def main_absent(prompts: list[str] | None) -> bool:
    """No prompt of the main kind was given (negative_prompt=None, whatever negative_prompt_2 says)."""
    return prompts is None or (isinstance(prompts, Prompts) and not prompts.main_given)


def prompts_for(prompts: list[str], component: str) -> list[str]:
    """What the encoder `component` takes from a batch's prompts."""
    return prompts.by_encoder.get(component, prompts) if isinstance(prompts, Prompts) else prompts


# diffusers' argument -> the text encoder component it is for
PROMPT_ARGUMENTS = {"prompt_2": "text_encoder_2", "prompt_3": "text_encoder_3"}
NEGATIVE_ARGUMENTS = {"negative_prompt_2": "text_encoder_2", "negative_prompt_3": "text_encoder_3"}


def per_encoder(main: list[str] | None, given: dict, components: list[str], count: int) -> list[str] | None:
    """`main` with the encoder-specific prompts in `given` (argument name -> str, list or None) as Prompts; an
    argument for an encoder the bundle lacks, or a list of another length than the batch's, is an InputError.
    As diffusers (`prompt_2 = prompt_2 or prompt`), an argument left None or empty falls back to `main`; with
    `main` None (no negative prompt) and an encoder's own given, the others take ""."""
    chosen = {}
    for argument, value in given.items():
        if not value:
            continue
        component = {**PROMPT_ARGUMENTS, **NEGATIVE_ARGUMENTS}[argument]
        if component not in components:
            raise InputError("prompt_encoder", argument=argument, component=component, have=", ".join(components))
        values = [value] * count if isinstance(value, str) else list(value)
        if len(values) != count:
            raise InputError("prompt_count", argument=argument, count=len(values), batch=count)
        chosen[component] = values
    if not chosen:
        return main
    return Prompts(main if main is not None else [""] * count, chosen, main_given=main is not None)


@dataclass
class _TextEncoder:
    component: str
    tokenizer: PromptTokenizer
    output: str  # the graph output the UNet takes as (its part of) encoder_hidden_states
    pooled: str | None  # the graph output given as text_embeds (SDXL's second encoder)


def text_encoders(bundle) -> list[_TextEncoder]:
    """The bundle's text encoders as the manifest lists them, each with its tokenizer."""
    return [
        _TextEncoder(
            e["component"],
            PromptTokenizer(
                bundle.tokenizer_file(e["tokenizer"]), e["tokenizer"]["max_length"], e["tokenizer"]["pad_id"]
            ),
            e["output"],
            e.get("pooled"),
        )
        for e in bundle.manifest.text_encoders
    ]


def run_encoder(
    enc: _TextEncoder, session, ids: np.ndarray, mask: np.ndarray | None = None, extra: dict | None = None
) -> dict[str, np.ndarray]:
    """One text encoder's outputs by name for token ids (and their attention mask, for encoders that take one:
    SANA's Gemma-2 and PixArt's T5; `extra`: other inputs); NaN or inf (an fp16 overflow) is an error."""
    feeds = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    feeds.update(extra or {})
    outputs = dict(zip(session.output_names, session.run(**feeds)))
    for name in (enc.output, enc.pooled):
        if name is not None and not np.isfinite(outputs[name]).all():
            raise NaNOutputError(
                "nan_output", component=enc.component.replace("_", " "), hint=" (fp16 overflow? try an fp32 bundle)"
            )
    return outputs


def run_timed(
    enc: _TextEncoder, tokenizer: PromptTokenizer, session, prompts: list[str], timings: dict, mask: bool = False
) -> dict:
    """Tokenizes `prompts` and runs one encoder on them, adding to the call's tokenize / text_encoder timings.
    `mask`: the encoder takes the attention mask too, and the outputs carry it as "attention_mask"."""
    t0 = time.perf_counter()
    ids, attention_mask = tokenizer.encode(prompts)
    t1 = time.perf_counter()
    outputs = run_encoder(enc, session, ids, attention_mask if mask else None)
    if mask:
        outputs["attention_mask"] = attention_mask
    timings["tokenize"] = timings.get("tokenize", 0.0) + t1 - t0
    timings["text_encoder"] = timings.get("text_encoder", 0.0) + time.perf_counter() - t1
    return outputs


# StableDiffusion3Pipeline and FluxPipeline refuse more T5 tokens (SANA's Gemma-2 takes the same bound)
MAX_SEQUENCE_LENGTH = 512


def sequence_length(value, default: int) -> int:
    """A call's T5 token count: `value`, or the bundle's `default` when None; InputError outside 1..512."""
    length = default if value is None else value
    if not isinstance(length, (int, np.integer)) or not 1 <= length <= MAX_SEQUENCE_LENGTH:
        raise InputError("max_sequence_length", limit=MAX_SEQUENCE_LENGTH, value=length)
    return int(length)


class LengthTokenizers:
    """One encoder's tokenizer padding to a call's max_sequence_length (T5's), made once per length."""

    def __init__(self, bundle, enc: _TextEncoder):
        self._entry = next(e["tokenizer"] for e in bundle.manifest.text_encoders if e["component"] == enc.component)
        self._file = bundle.tokenizer_file(self._entry)
        self._made = {enc.tokenizer.max_length: enc.tokenizer}

    def __call__(self, length: int) -> PromptTokenizer:
        if length not in self._made:
            self._made[length] = PromptTokenizer(self._file, length, self._entry["pad_id"])
        return self._made[length]


class TextConditioner:
    """Encodes prompts into the UNet's text inputs; `sessions` is the pipeline's SessionPool."""

    def __init__(self, bundle, sessions):
        m = bundle.manifest
        self.encoders = text_encoders(bundle)
        # SDXL's force_zeros_for_empty_prompt: without a negative prompt, the unconditional input is zeros
        self.zero_negative = bool(m.conditioning.get("zero_negative", False))
        self.time_ids = m.conditioning.get("time_ids")  # "size-crop-target" for SDXL
        self.sessions = sessions

    @property
    def components(self) -> list[str]:
        return [e.component for e in self.encoders]

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The first encoder's tokenizer (prompt length checks, token counts)."""
        return self.encoders[0].tokenizer

    def encode(self, prompts: list[str], timings: dict) -> tuple[np.ndarray, np.ndarray | None]:
        """(hidden states (B, T, D), pooled (B, P) or None) for `prompts`."""
        hidden, pooled = [], None
        for enc in self.encoders:
            outputs = run_timed(
                enc, enc.tokenizer, self.sessions.get(enc.component), prompts_for(prompts, enc.component), timings
            )
            hidden.append(outputs[enc.output].astype(np.float32))
            if enc.pooled:
                pooled = outputs[enc.pooled].astype(np.float32)
        return np.concatenate(hidden, axis=-1), pooled

    def __call__(
        self,
        prompts: list[str],
        negatives: list[str] | None,
        do_cfg: bool,
        repeat: int,
        height: int,
        width: int,
        timings: dict,
    ) -> dict[str, np.ndarray]:
        """The UNet's text feeds for a batch of len(prompts) * repeat images; with classifier-free guidance
        the unconditional half comes first, as in diffusers."""
        cond, pooled = self.encode(prompts, timings)
        if do_cfg:
            # as StableDiffusionXLPipeline: zeros when negative_prompt is None, whatever negative_prompt_2 is
            if main_absent(negatives) and self.zero_negative:
                uncond, uncond_pooled = np.zeros_like(cond), None if pooled is None else np.zeros_like(pooled)
            else:
                uncond, uncond_pooled = self.encode(negatives or [""] * len(prompts), timings)
            cond = np.concatenate([np.repeat(uncond, repeat, 0), np.repeat(cond, repeat, 0)])
            pooled = (
                None
                if pooled is None
                else np.concatenate([np.repeat(uncond_pooled, repeat, 0), np.repeat(pooled, repeat, 0)])
            )
        else:
            cond = np.repeat(cond, repeat, 0)
            pooled = None if pooled is None else np.repeat(pooled, repeat, 0)
        feeds = {"encoder_hidden_states": cond}
        if pooled is not None:
            feeds["text_embeds"] = pooled
        if self.time_ids == "size-crop-target":
            # original size = target size = the image's, no crop (diffusers' defaults)
            ids = np.array([height, width, 0, 0, height, width], dtype=np.float32)
            feeds["time_ids"] = np.tile(ids, (cond.shape[0], 1))
        return feeds
