"""One generation request, whichever API it came through, checked against the limits and the model's
manifest before it is queued: a bad field is a 400 naming it, never a failure inside a worker."""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from PIL import Image
from starlette.requests import Request

from edgediff.runtime import InputError
from edgediff.runtime.conditioning import MAX_SEQUENCE_LENGTH, NEGATIVE_ARGUMENTS, PROMPT_ARGUMENTS
from edgediff.runtime.denoisers import DENOISER_CLASSES, JOINT_CLASSES, size_multiple
from edgediff.runtime.schedulers import make_sampler

from .config import Limits
from .errors import bad_request
from .images import FORMATS
from .models import ModelCatalog

MAX_GUIDANCE = 50.0
SEED_LIMIT = 2**32  # seeds are 32-bit, as AUTOMATIC1111's (image i of a request uses seed + i)
# the runtime's text-side arguments of the transformer families, under diffusers' names in every API: what the
# second and third text encoders read instead of the prompt (SDXL's second CLIP; SD3's CLIP-G and T5; FLUX's T5)
ENCODER_PROMPTS = ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3")
TEXT_ARGUMENTS = (*ENCODER_PROMPTS, "true_cfg_scale", "max_sequence_length")
# each one's name in the infotext (A1111 has none of them)
_INFOTEXT_NAMES = {
    "prompt_2": "Prompt 2",
    "prompt_3": "Prompt 3",
    "negative_prompt_2": "Negative prompt 2",
    "negative_prompt_3": "Negative prompt 3",
    "true_cfg_scale": "True CFG scale",
    "max_sequence_length": "Max sequence length",
}


@dataclass
class GenerationRequest:
    model: str
    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    sampler: str  # the pipeline's (reported back; requests cannot change it)
    image: Image.Image | None = None  # image-to-image / inpainting source
    mask: Image.Image | None = None  # L image, white = repaint
    strength: float | None = None
    preview: bool = False  # previews of the current estimate after each step (costs a small decode per step)
    output_format: str = "png"
    prompt_2: str | None = None
    prompt_3: str | None = None
    negative_prompt_2: str | None = None
    negative_prompt_3: str | None = None
    true_cfg_scale: float | None = None  # FLUX bundles' true CFG (FluxPipeline's)
    max_sequence_length: int | None = None  # T5 / Gemma tokens (SD3, FLUX, SANA, PixArt bundles)

    def text_arguments(self) -> dict:
        """The runtime's text-side arguments this request sets (for the pipeline call and the settings)."""
        values = {name: getattr(self, name) for name in TEXT_ARGUMENTS}
        return {name: value for name, value in values.items() if value is not None}

    def settings(self) -> dict:
        """What reproduces the image (the web page's gallery, A1111's info, the job API)."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            **self.text_arguments(),
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "seed": self.seed,
            "n": self.n,
            "sampler": self.sampler,
            **({"strength": self.strength} if self.image is not None else {}),
        }

    def infotext(self, index: int = 0) -> str:
        """AUTOMATIC1111's one-paragraph settings (also written into each PNG)."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        extra = f", Denoising strength: {self.strength}" if self.image is not None and self.strength else ""
        for name, value in self.text_arguments().items():
            extra += f", {_INFOTEXT_NAMES[name]}: {_quote(value if isinstance(value, str) else f'{value:g}')}"
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.guidance:g}, Seed: {self.seed + index}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}{extra}, Version: edgediff"
        )
        return "\n".join(lines)


def _quote(text: str) -> str:
    """A value in the infotext's last line, as AUTOMATIC1111 quotes it (JSON when it has a comma, colon or newline)."""
    if not any(c in text for c in ',:\n"'):
        return text
    return json.dumps(text, ensure_ascii=False)


async def json_body(request: Request) -> dict:
    """The request's JSON object, or a 400 that says what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object", code="invalid_json")
    return body


class Fields:
    """Typed reads of a JSON object or a form (whose values are strings); each error names its field."""

    def __init__(self, data: Mapping[str, Any], from_form: bool = False):
        self.data = data
        self.from_form = from_form

    def get(self, name: str) -> Any:
        value = self.data.get(name)
        return None if value is None or (self.from_form and value == "") else value

    def text(self, name: str, limit: int, required: bool = False, default: str | None = None) -> str | None:
        value = self.get(name)
        if value is None:
            if required:
                raise bad_request(f"{name} is required", name, code="missing_field")
            return default
        if not isinstance(value, str):
            raise bad_request(f"{name} must be a string", name)
        if len(value) > limit:
            raise bad_request(f"{name} has {len(value)} characters; at most {limit} are accepted", name)
        return value

    def integer(self, name: str, low: int, high: int, default: int | None = None) -> int | None:
        value = self.get(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad_request(f"{name} must be an integer, got {value!r}", name) from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"{name} must be an integer", name)
        if not low <= value <= high:
            raise bad_request(f"{name} must be between {low} and {high}, got {value}", name)
        return value

    def number(self, name: str, low: float, high: float, default: float | None = None) -> float | None:
        value = self.get(name)
        if value is None:
            return default
        if self.from_form and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad_request(f"{name} must be a number, got {value!r}", name) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad_request(f"{name} must be a number", name)
        if not low <= value <= high:
            raise bad_request(f"{name} must be between {low:g} and {high:g}, got {value:g}", name)
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.get(name)
        if value is None:
            return default
        if value not in choices:
            raise bad_request(f"{name} must be one of {', '.join(choices)}, got {value!r}", name)
        return value


def parse_size(value: object, param: str = "size") -> tuple[int, int] | None:
    """OpenAI's "WIDTHxHEIGHT" (or "auto": the model's default size)."""
    if value is None or value == "auto":
        return None
    if isinstance(value, str):
        width, sep, height = value.lower().partition("x")
        if sep and width.isdigit() and height.isdigit():
            return int(width), int(height)
    raise bad_request(f"{param} must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {value!r}", param)


def random_seed() -> int:
    return secrets.randbelow(SEED_LIMIT)


def build_request(
    catalog: ModelCatalog,
    limits: Limits,
    *,
    model: str | None,
    prompt: str,
    negative_prompt: str | None = None,
    n: int = 1,
    size: tuple[int, int] | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    image: Image.Image | None = None,
    mask: Image.Image | None = None,
    strength: float | None = None,
    preview: bool = False,
    output_format: str = "png",
    size_param: str = "size",
    sampler: str | None = None,
    prompt_2: str | None = None,
    prompt_3: str | None = None,
    negative_prompt_2: str | None = None,
    negative_prompt_3: str | None = None,
    true_cfg_scale: float | None = None,
    max_sequence_length: int | None = None,
) -> GenerationRequest:
    """Fills the model's defaults in and checks what depends on the model (its size multiple)."""
    entry = catalog.get(model)
    manifest = entry.manifest
    if not 1 <= n <= limits.max_images:
        raise bad_request(f"n must be between 1 and {limits.max_images}, got {n}", "n")
    if size is None and image is not None:  # the image's own size, rounded down to the latent grid
        multiple = size_multiple(manifest)
        size = (image.width // multiple * multiple, image.height // multiple * multiple)
    width, height = size or (manifest.defaults["width"], manifest.defaults["height"])
    multiple = size_multiple(manifest)
    for value in (width, height):
        if not multiple <= value <= limits.max_side or value % multiple:
            raise bad_request(
                f"{size_param}: width and height must be multiples of {multiple} between {multiple} and "
                f"{limits.max_side}, got {width}x{height}",
                size_param,
            )
    if output_format not in FORMATS:
        raise bad_request(f"output_format must be one of {', '.join(FORMATS)}", "output_format")
    sampler = sampler or manifest.scheduler["name"]
    steps = manifest.defaults["steps"] if steps is None else steps
    _check_steps(manifest, sampler, steps)
    # as the runtime (diffusers' `prompt_2 or prompt`), an empty one falls back to the prompt / negative_prompt
    encoder_prompts = {
        "prompt_2": prompt_2 or None,
        "prompt_3": prompt_3 or None,
        "negative_prompt_2": negative_prompt_2 or None,
        "negative_prompt_3": negative_prompt_3 or None,
    }
    _check_text_arguments(manifest, encoder_prompts, true_cfg_scale)
    return GenerationRequest(
        model=entry.name,
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        n=n,
        width=width,
        height=height,
        steps=steps,
        guidance=float(manifest.defaults["guidance"]) if guidance is None else guidance,
        seed=random_seed() if seed is None else seed,
        sampler=sampler,
        image=image,
        mask=mask,
        strength=strength if strength is not None or image is None else (1.0 if mask is not None else 0.8),
        preview=preview,
        output_format=output_format,
        **encoder_prompts,
        true_cfg_scale=true_cfg_scale,
        max_sequence_length=max_sequence_length,
    )


def _check_text_arguments(manifest, encoder_prompts: dict, true_cfg_scale: float | None) -> None:
    """What the bundle refuses of the text-side arguments, refused now (a 400 naming the field, in the runtime's
    words) rather than by the worker: a prompt for a text encoder the bundle lacks (prompt_3 without T5), and
    true_cfg_scale on a bundle without FLUX's true CFG."""
    components = [encoder["component"] for encoder in manifest.text_encoders]
    for name, value in encoder_prompts.items():
        component = {**PROMPT_ARGUMENTS, **NEGATIVE_ARGUMENTS}[name]
        if value is not None and component not in components:
            error = InputError("prompt_encoder", argument=name, component=component, have=", ".join(components))
            raise bad_request(str(error), name)
    # the denoiser make_denoiser() would open for this bundle (its class says whether it takes true CFG)
    denoiser = JOINT_CLASSES.get(manifest.conditioning.get("joint")) or DENOISER_CLASSES[manifest.denoiser]
    if true_cfg_scale is not None and not denoiser.true_cfg:
        raise bad_request(str(InputError("true_cfg_family", family=manifest.family)), "true_cfg_scale")


def _check_steps(manifest, sampler: str, steps: int) -> None:
    """Distilled samplers (LCM, TCD) step only on their training grid (the shipped model's: 50 steps at most):
    asking the sampler now makes that a 400 naming `steps`, not a failed job."""
    try:
        make_sampler(sampler, manifest.scheduler["config"]).set_timesteps(steps)
    except (ValueError, KeyError) as exc:
        raise bad_request(f"steps: {exc}", "steps") from None


def text_fields(fields: Fields, limits: Limits) -> dict:
    """The runtime's text-side arguments, taken by every API that takes negative_prompt, under diffusers' names:
    prompt_2, prompt_3, negative_prompt_2, negative_prompt_3 (bounded as prompts), true_cfg_scale (FLUX's true
    CFG: 1, off, to MAX_GUIDANCE) and max_sequence_length (T5 / Gemma tokens, as the runtime bounds them)."""
    return {
        **{name: fields.text(name, limits.max_prompt_chars) for name in ENCODER_PROMPTS},
        "true_cfg_scale": fields.number("true_cfg_scale", 1.0, MAX_GUIDANCE),
        "max_sequence_length": fields.integer("max_sequence_length", 1, MAX_SEQUENCE_LENGTH),
    }


def common_fields(fields: Fields, limits: Limits) -> dict:
    """edgediff's fields every API takes under the same names: seed, steps, guidance, negative_prompt and the
    text-side arguments (text_fields)."""
    return {
        "negative_prompt": fields.text("negative_prompt", limits.max_prompt_chars),
        **text_fields(fields, limits),
        "steps": fields.integer("steps", 1, limits.max_steps),
        "guidance": fields.number("guidance", 0.0, MAX_GUIDANCE),
        "seed": fields.integer("seed", 0, SEED_LIMIT - 1),
    }
