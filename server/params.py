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

from edgediff.runtime.denoisers import size_multiple
from edgediff.runtime.schedulers import make_sampler

from .config import Limits
from .errors import bad_request
from .images import FORMATS
from .models import ModelCatalog

MAX_GUIDANCE = 50.0
SEED_LIMIT = 2**32  # seeds are 32-bit, as AUTOMATIC1111's (image i of a request uses seed + i)


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

    def settings(self) -> dict:
        """What reproduces the image (the web page's gallery, A1111's info, the job API)."""
        return {
            "model": self.model,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
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
        lines.append(
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.guidance:g}, Seed: {self.seed + index}, "
            f"Size: {self.width}x{self.height}, Model: {self.model}{extra}, Version: edgediff"
        )
        return "\n".join(lines)


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
    )


def _check_steps(manifest, sampler: str, steps: int) -> None:
    """Distilled samplers (LCM, TCD) step only on their training grid (the shipped model's: 50 steps at most):
    asking the sampler now makes that a 400 naming `steps`, not a failed job."""
    try:
        make_sampler(sampler, manifest.scheduler["config"]).set_timesteps(steps)
    except (ValueError, KeyError) as exc:
        raise bad_request(f"steps: {exc}", "steps") from None


def common_fields(fields: Fields, limits: Limits) -> dict:
    """edgediff's fields every API takes under the same names: seed, steps, guidance, negative_prompt."""
    return {
        "negative_prompt": fields.text("negative_prompt", limits.max_prompt_chars),
        "steps": fields.integer("steps", 1, limits.max_steps),
        "guidance": fields.number("guidance", 0.0, MAX_GUIDANCE),
        "seed": fields.integer("seed", 0, SEED_LIMIT - 1),
    }
