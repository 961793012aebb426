"""OpenAI's images API, as its clients call it: /v1/images/generations, /v1/images/edits, /v1/models.

Beyond OpenAI's fields, requests may carry edgediff's: seed, steps, guidance, negative_prompt (and strength
for edits), and the transformer families' text-side arguments under diffusers' names (prompt_2, prompt_3,
negative_prompt_2, negative_prompt_3, true_cfg_scale, max_sequence_length); each returned image also says its seed. response_format defaults to b64_json (as for OpenAI's
gpt-image models); `url` links to this server's /images/NAME.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from edgediff.runtime.denoisers import size_multiple

from .errors import ApiError, bad_request
from .images import FORMATS, b64, mask_from_alpha_or_luminance, open_image
from .jobs import DONE, Job
from .params import Fields, common_fields, json_body, parse_size

RESPONSE_FORMATS = ("b64_json", "url")
FORM_FIELD_BYTES = 64 * 1024  # a multipart field that is not a file (the prompt is the longest)


def _state(request: Request):
    return request.app.state.server


def _images_response(job: Job, response_format: str, request: Request) -> JSONResponse:
    if job.state != DONE:
        raise job.error
    data = []
    for result in job.results:
        if response_format == "url":
            item = {"url": str(request.url_for("stored_image", name=result.name))}
        else:
            item = {"b64_json": b64(result.data)}
        data.append({**item, "revised_prompt": None, "seed": result.seed})
    return JSONResponse({"created": int(job.created), "data": data, "output_format": job.request.output_format})


async def generations(request: Request) -> JSONResponse:
    state = _state(request)
    limits = state.config.limits
    fields = Fields(await json_body(request))
    if fields.get("stream"):
        raise bad_request("stream is not supported here; use the job API's event stream for progress", "stream")
    response_format = fields.choice("response_format", RESPONSE_FORMATS, "b64_json")
    generation = state.build(
        model=fields.get("model"),
        prompt=fields.text("prompt", limits.max_prompt_chars, required=True),
        n=fields.integer("n", 1, limits.max_images, 1),
        size=parse_size(fields.get("size")),
        output_format=fields.choice("output_format", tuple(FORMATS), "png"),
        **common_fields(fields, limits),
    )
    job = Job(generation, "openai", store_results=response_format == "url")
    return _images_response(await state.run_until_done(job, request), response_format, request)


async def _upload(form, names: tuple[str, ...], limit: int, required: bool) -> bytes | None:
    """The first file sent under any of `names` (clients send `image` or `image[]`), read up to the limit."""
    for name in names:
        values = form.getlist(name)
        if values:
            value = values[0]
            if not isinstance(value, UploadFile):
                raise bad_request(f"{names[0]} must be a file upload (multipart/form-data)", names[0])
            data = await value.read(limit + 1)
            if len(data) > limit:
                raise ApiError(413, f"{names[0]} is larger than {limit} bytes", code="upload_too_large", param=names[0])
            return data
    if required:
        raise bad_request(f"{names[0]} is required (a PNG, JPEG or WebP file)", names[0], code="missing_field")
    return None


async def edits(request: Request) -> JSONResponse:
    """Image-to-image; with a mask, inpainting (transparent mask pixels, or white ones in a mask without
    alpha, are repainted; the rest of the image is kept exactly)."""
    state = _state(request)
    limits = state.config.limits
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise bad_request("edits take multipart/form-data with an image file", code="invalid_content_type")
    async with request.form(max_files=4, max_fields=64, max_part_size=FORM_FIELD_BYTES) as form:
        image_data = await _upload(form, ("image", "image[]"), limits.max_upload_bytes, required=True)
        mask_data = await _upload(form, ("mask",), limits.max_upload_bytes, required=False)
        fields = Fields(form, from_form=True)
        response_format = fields.choice("response_format", RESPONSE_FORMATS, "b64_json")
        strength = fields.number("strength", 0.0, 1.0)
        if strength == 0.0:
            raise bad_request("strength must be above 0 (0 would return the image unchanged)", "strength")
        image = open_image(image_data, "image", limits)
        mask = mask_from_alpha_or_luminance(open_image(mask_data, "mask", limits, mode=None)) if mask_data else None
        generation = state.build(
            model=fields.get("model"),
            prompt=fields.text("prompt", limits.max_prompt_chars, required=True),
            n=fields.integer("n", 1, limits.max_images, 1),
            size=parse_size(fields.get("size")),
            output_format=fields.choice("output_format", tuple(FORMATS), "png"),
            image=image,
            mask=mask,
            strength=strength,
            **common_fields(fields, limits),
        )
    job = Job(generation, "openai", store_results=response_format == "url")
    return _images_response(await state.run_until_done(job, request), response_format, request)


def _model_object(entry) -> dict:
    """OpenAI's model object, plus the bundle's defaults and the multiple its sides take (the web page fills and
    steps its fields from them)."""
    d = entry.manifest.defaults
    defaults = {"width": d["width"], "height": d["height"], "steps": d["steps"], "guidance": d["guidance"]}
    defaults["size_multiple"] = size_multiple(entry.manifest)
    return {"id": entry.name, "object": "model", "created": 0, "owned_by": "edgediff", "defaults": defaults}


async def list_models(request: Request) -> JSONResponse:
    catalog = _state(request).catalog
    return JSONResponse({"object": "list", "data": [_model_object(catalog.get(n)) for n in catalog.names()]})


async def get_model(request: Request) -> JSONResponse:
    return JSONResponse(_model_object(_state(request).catalog.get(request.path_params["name"])))


routes = [
    Route("/v1/images/generations", generations, methods=["POST"]),
    Route("/v1/images/edits", edits, methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{name:path}", get_model, methods=["GET"]),
]
