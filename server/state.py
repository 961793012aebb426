"""What the routes share: the configuration, the catalogue, the pipelines, the queue, the image store and
the counters; and the one way a request waits for its job (cancelling it if the client goes away)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import Request

from .config import ServerConfig
from .errors import ApiError
from .images import ImageStore
from .jobs import Job, JobQueue
from .metrics import Metrics
from .models import ModelCatalog, PipelineCache
from .params import GenerationRequest, build_request


@dataclass
class ServerState:
    config: ServerConfig
    catalog: ModelCatalog
    cache: PipelineCache
    store: ImageStore
    metrics: Metrics
    queue: JobQueue
    sdapi_model: str  # AUTOMATIC1111's "current checkpoint" (POST /sdapi/v1/options changes it)

    @classmethod
    def from_config(cls, config: ServerConfig) -> "ServerState":
        catalog = ModelCatalog(config.models)
        cache = PipelineCache(catalog, config.runtime, config.idle_seconds)
        store = ImageStore(config.stored_image_bytes)
        metrics = Metrics()
        queue = JobQueue(cache, store, metrics, config.queue_size, config.workers, config.kept_jobs)
        return cls(config, catalog, cache, store, metrics, queue, catalog.default)

    def build(self, **fields) -> GenerationRequest:
        return build_request(self.catalog, self.config.limits, sampler=self.config.runtime.sampler, **fields)

    async def run_until_done(self, job: Job, request: Request) -> Job:
        """Queues the job and waits for it; a client that disconnects meanwhile cancels it."""
        self.queue.submit(job)
        waiting = asyncio.ensure_future(job.wait())
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
            leaving.cancel()
        if waiting not in done:
            self.queue.cancel(job.id)
            raise ApiError(400, "the client disconnected; its job was cancelled", code="client_disconnected")
        return job


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
