"""The part of AUTOMATIC1111's web UI API its clients use: txt2img, img2img, progress, interrupt, models.

Requests and answers keep A1111's names (cfg_scale, denoising_strength, batch_size * n_iter images, seed
-1 for random, `info` as a JSON string); the model is chosen by override_settings.sd_model_checkpoint or
POST /sdapi/v1/options. A1111 has no fields for the transformer families' other text encoders: edgediff's extras
keep the names the other APIs take (diffusers'): prompt_2, prompt_3, negative_prompt_2, negative_prompt_3,
true_cfg_scale, max_sequence_length. Like A1111, progress and interrupt concern the running job; an interrupted
request still answers 200, with the latest preview as its image (A1111 decodes what it has too).
"""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgediff.runtime.schedulers import SAMPLERS

from .errors import bad_request
from .images import b64, decode_base64_image
from .jobs import CANCELLED, DONE, Job
from .params import MAX_GUIDANCE, SEED_LIMIT, Fields, GenerationRequest, json_body, text_fields

IMG2IMG_STRENGTH = 0.75  # A1111's default denoising_strength


def _state(request: Request):
    return request.app.state.server


def _model_name(state, fields: Fields) -> str:
    overrides = fields.get("override_settings")
    if overrides is not None and not isinstance(overrides, dict):
        raise bad_request("override_settings must be an object", "override_settings")
    name = (overrides or {}).get("sd_model_checkpoint")
    return state.sdapi_model if name is None else name


def _generation(state, body: dict, img2img: bool) -> tuple[GenerationRequest, dict]:
    limits = state.config.limits
    fields = Fields(body)
    batch = fields.integer("batch_size", 1, limits.max_images, 1)
    iterations = fields.integer("n_iter", 1, limits.max_images, 1)
    if batch * iterations > limits.max_images:
        raise bad_request(
            f"batch_size * n_iter must be at most {limits.max_images}, got {batch * iterations}", "n_iter"
        )
    seed = fields.integer("seed", -1, SEED_LIMIT - 1, -1)
    entry = state.catalog.get(_model_name(state, fields))
    width = fields.integer("width", 1, limits.max_side)
    height = fields.integer("height", 1, limits.max_side)
    size = None
    if width is not None or height is not None:
        size = (width or entry.manifest.defaults["width"], height or entry.manifest.defaults["height"])
    image = mask = strength = None
    if img2img:
        images = fields.get("init_images")
        if not isinstance(images, list) or not images:
            raise bad_request("init_images must be a list with one base64 image", "init_images")
        image = decode_base64_image(images[0], "init_images", limits)
        strength = fields.number("denoising_strength", 0.0, 1.0, IMG2IMG_STRENGTH)
        if strength == 0.0:
            raise bad_request("denoising_strength must be above 0", "denoising_strength")
        if fields.get("mask") is not None:
            mask = decode_base64_image(fields.get("mask"), "mask", limits, mode="L")
            if fields.integer("inpainting_mask_invert", 0, 1, 0):
                mask = mask.point(lambda v: 255 - v)
    generation = state.build(
        model=entry.name,
        prompt=fields.text("prompt", limits.max_prompt_chars, default=""),
        negative_prompt=fields.text("negative_prompt", limits.max_prompt_chars),
        n=batch * iterations,
        size=size,
        steps=fields.integer("steps", 1, limits.max_steps),
        guidance=fields.number("cfg_scale", 0.0, MAX_GUIDANCE),
        seed=None if seed == -1 else seed,
        image=image,
        mask=mask,
        strength=strength,
        preview=True,  # progress' current_image
        size_param="width/height",
        **text_fields(fields, limits),
    )
    return generation, {"batch_size": batch, "n_iter": iterations, "send_images": fields.get("send_images")}


def _info(job: Job, extra: dict) -> dict:
    r = job.request
    n = r.n
    return {
        "prompt": r.prompt,
        "all_prompts": [r.prompt] * n,
        "negative_prompt": r.negative_prompt or "",
        "all_negative_prompts": [r.negative_prompt or ""] * n,
        "seed": r.seed,
        "all_seeds": [r.seed + i for i in range(n)],
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": r.width,
        "height": r.height,
        "sampler_name": r.sampler,
        "cfg_scale": r.guidance,
        "steps": r.steps,
        "batch_size": extra["batch_size"],
        "n_iter": extra["n_iter"],
        "restore_faces": False,
        "sd_model_name": r.model,
        "sd_model_hash": None,
        "denoising_strength": r.strength,
        "clip_skip": 1,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
        "infotexts": [r.infotext(i) for i in range(n)],
        "interrupted": job.state == CANCELLED,
        "version": "edgediff",
        **r.text_arguments(),  # edgediff's extras, when given
    }


async def _generate(request: Request, img2img: bool) -> JSONResponse:
    state = _state(request)
    body = await json_body(request)
    generation, extra = _generation(state, body, img2img)
    job = await state.run_until_done(Job(generation, "sdapi"), request)
    if job.state == DONE:
        images = [b64(result.data) for result in job.results]
    elif job.state == CANCELLED:  # interrupted: what there is, as A1111 answers
        images = [b64(job.preview)] if job.preview else []
    else:
        raise job.error
    if extra["send_images"] is False:
        images = []
    r = generation
    parameters = {
        **body,
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt or "",
        "seed": r.seed,
        "steps": r.steps,
        "cfg_scale": r.guidance,
        "width": r.width,
        "height": r.height,
        "batch_size": extra["batch_size"],
        "n_iter": extra["n_iter"],
        "sampler_name": r.sampler,
    }
    if img2img:  # A1111 leaves the uploads out of the echo unless asked (include_init_images)
        parameters.update(init_images=None, mask=None, denoising_strength=r.strength)
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(_info(job, extra))})


async def txt2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=False)


async def img2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=True)


async def progress(request: Request) -> JSONResponse:
    state = _state(request)
    skip_image = request.query_params.get("skip_current_image", "false").lower() in ("1", "true")
    running = state.queue.running()
    waiting = state.queue.depth
    job = running[0] if running else None
    if job is None:
        return JSONResponse(
            {
                "progress": 0.0,
                "eta_relative": 0.0,
                "state": _state_block(None, waiting),
                "current_image": None,
                "textinfo": None,
            }
        )
    fraction = job.progress
    elapsed = time.monotonic() - (job.started or time.monotonic())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    preview = job.preview
    return JSONResponse(
        {
            "progress": fraction,
            "eta_relative": eta,
            "state": _state_block(job, len(running) + waiting),
            "current_image": None if skip_image or preview is None else b64(preview),
            "textinfo": None,
        }
    )


def _state_block(job: Job | None, job_count: int) -> dict:
    return {
        "skipped": False,
        "interrupted": bool(job and job.cancel_token.cancelled),
        "stopping_generation": False,
        "job": f"task({job.id})" if job else "",
        "job_count": job_count,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)) if job else "0",
        "job_no": 0,
        "sampling_step": job.step if job else 0,
        "sampling_steps": (job.total or job.request.steps) if job else 0,
    }


async def interrupt(request: Request) -> JSONResponse:
    state = _state(request)
    for job in state.queue.running():
        state.queue.cancel(job.id)
    return JSONResponse({})


async def sd_models(request: Request) -> JSONResponse:
    # names only: A1111 lists file paths, but a client never needs this machine's folders
    return JSONResponse(
        [
            {"title": n, "model_name": n, "hash": None, "sha256": None, "filename": n, "config": None}
            for n in _state(request).catalog.names()
        ]
    )


async def samplers(request: Request) -> JSONResponse:
    return JSONResponse([{"name": name, "aliases": [], "options": {}} for name in SAMPLERS])


async def options(request: Request) -> JSONResponse:
    state = _state(request)
    if request.method == "POST":
        fields = Fields(await json_body(request))
        name = fields.get("sd_model_checkpoint")
        if name is not None:
            state.sdapi_model = state.catalog.get(name).name
        return JSONResponse(None)
    return JSONResponse({"sd_model_checkpoint": state.sdapi_model, "samples_format": "png"})


routes = [
    Route("/sdapi/v1/txt2img", txt2img, methods=["POST"]),
    Route("/sdapi/v1/img2img", img2img, methods=["POST"]),
    Route("/sdapi/v1/progress", progress, methods=["GET"]),
    Route("/sdapi/v1/interrupt", interrupt, methods=["POST"]),
    Route("/sdapi/v1/sd-models", sd_models, methods=["GET"]),
    Route("/sdapi/v1/samplers", samplers, methods=["GET"]),
    Route("/sdapi/v1/options", options, methods=["GET", "POST"]),
]
