"""edgediff's own job API (the web page uses it): start a job, follow it as server-sent events, cancel it.

POST /v1/jobs takes the fields of /v1/images/generations and answers 202 at once. GET /v1/jobs/ID/events
streams `status`, then `progress` after each step (step, total, a preview as a data URL), then one of
`done`, `failed` or `cancelled`. DELETE /v1/jobs/ID cancels (within one denoiser call). A client that
closes the event stream of an unfinished job cancels it.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .errors import ApiError
from .images import FORMATS, b64
from .jobs import RUNNING, Job
from .params import Fields, common_fields, json_body, parse_size

KEEPALIVE_SECONDS = 15  # a comment line now and then keeps proxies from closing a quiet stream


def _state(request: Request):
    return request.app.state.server


def _not_found(job_id: str) -> ApiError:
    return ApiError(404, f"no job {job_id!r} (finished jobs are kept for a while only)", code="job_not_found")


def _job(request: Request) -> Job:
    job_id = request.path_params["job_id"]
    job = _state(request).queue.get(job_id)
    if job is None:
        raise _not_found(job_id)
    return job


def snapshot(job: Job, request: Request) -> dict:
    status = job.state
    if status == RUNNING and job.cancel_token.cancelled:
        status = "cancelling"
    seconds = None if job.started is None else (job.ended or time.monotonic()) - job.started
    return {
        "id": job.id,
        "object": "edgediff.job",
        "status": status,
        "created": int(job.created),
        "step": job.step,
        "total": job.total,
        "progress": job.progress,
        "seconds": seconds,
        "settings": job.request.settings(),
        "images": [
            {"url": str(request.url_for("stored_image", name=r.name)), "seed": r.seed} for r in job.results if r.name
        ],
        "error": job.error.body()["error"] if job.error else None,
        "events": str(request.url_for("job_events", job_id=job.id)),
    }


async def create_job(request: Request) -> JSONResponse:
    state = _state(request)
    limits = state.config.limits
    fields = Fields(await json_body(request))
    preview = fields.get("preview")
    if preview is not None and not isinstance(preview, bool):
        raise ApiError(400, "preview must be true or false", code="invalid_value", param="preview")
    generation = state.build(
        model=fields.get("model"),
        prompt=fields.text("prompt", limits.max_prompt_chars, required=True),
        n=fields.integer("n", 1, limits.max_images, 1),
        size=parse_size(fields.get("size")),
        output_format=fields.choice("output_format", tuple(FORMATS), "png"),
        preview=preview is not False,
        **common_fields(fields, limits),
    )
    job = state.queue.submit(Job(generation, "jobs", store_results=True, keep=True))
    return JSONResponse(snapshot(job, request), status_code=202)


async def get_job(request: Request) -> JSONResponse:
    return JSONResponse(snapshot(_job(request), request))


async def cancel_job(request: Request) -> JSONResponse:
    job = _state(request).queue.cancel(request.path_params["job_id"])
    if job is None:
        raise _not_found(request.path_params["job_id"])
    return JSONResponse(snapshot(job, request), status_code=202)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def job_events(request: Request) -> StreamingResponse:
    job = _job(request)
    queue = _state(request).queue

    async def stream():
        changed = job.listen()
        sent_step = -1
        try:
            yield _event("status", snapshot(job, request))
            while True:
                changed.clear()  # before reading the job: a change after this read sets it again
                step, total, preview = job.step, job.total, job.preview
                if step != sent_step and step > 0:
                    sent_step = step
                    data = {"id": job.id, "step": step, "total": total, "progress": job.progress}
                    data["preview"] = f"data:image/png;base64,{b64(preview)}" if preview else None
                    yield _event("progress", data)
                if job.finished:
                    yield _event(job.state, snapshot(job, request))
                    return
                try:
                    await asyncio.wait_for(changed.wait(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
        finally:
            job.unlisten(changed)
            if not job.finished:  # the watcher went away (a closed tab): nobody wants the image
                queue.cancel(job.id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def stored_image(request: Request) -> Response:
    found = _state(request).store.get(request.path_params["name"])
    if found is None:
        raise ApiError(404, "no such image (images are kept for a while only)", code="image_not_found")
    data, media_type = found
    return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})


routes = [
    Route("/v1/jobs", create_job, methods=["POST"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", cancel_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"], name="job_events"),
    Route("/images/{name}", stored_image, methods=["GET"], name="stored_image"),
]
