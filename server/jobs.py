"""Jobs, the bounded queue and the worker threads that run them.

A request becomes a Job; `JobQueue.submit` refuses it (429) when `queue_size` jobs already wait. Workers
take jobs in order, run them on the model's shared pipeline with the job's CancelToken (a cancel lands
within one denoiser call), and wake the request handlers waiting on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

from edgediff.runtime import Cancelled, CancelToken, EdgediffError, InputError

from .errors import ApiError
from .images import ImageStore, encode
from .metrics import Metrics
from .models import PipelineCache
from .params import GenerationRequest

log = logging.getLogger("edgediff.server")

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)
MAX_RETRY_AFTER = 60
# the request field an InputError of the runtime is about, by its key (the others name no one field)
INPUT_ERROR_FIELDS = {
    "max_sequence_length": "max_sequence_length",
    "true_cfg_family": "true_cfg_scale",
    "true_cfg_scale": "true_cfg_scale",
    "negative_prompt_embedded": "negative_prompt",
}


@dataclass
class Result:
    seed: int
    data: bytes | None  # the encoded image, unless it went to the store
    name: str | None  # its name in the ImageStore (served at /images/NAME)


class Job:
    def __init__(self, request: GenerationRequest, origin: str, store_results: bool = False, keep: bool = False):
        self.id = uuid.uuid4().hex
        self.request = request
        self.origin = origin  # "openai", "sdapi" or "jobs" (the job API and the web page)
        self.store_results = store_results  # results go to the ImageStore (url responses, the job API)
        self.keep = keep  # stays queryable by id after it ends (the job API); others are dropped at once
        self.state = QUEUED
        self.step = 0
        self.total = 0
        self.preview: bytes | None = None  # PNG of the latest estimate, when the request asked for previews
        self.results: list[Result] = []
        self.error: ApiError | None = None
        self.created = time.time()
        self.started: float | None = None  # monotonic
        self.ended: float | None = None
        self.compute_seconds = 0.0  # generating and encoding, without waiting for the model to open
        self.cancel_token = CancelToken()
        try:  # handlers create jobs on the event loop; workers wake them through it
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._listeners: set[asyncio.Event] = set()
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def progress(self) -> float:
        if self.state == DONE:
            return 1.0
        return self.step / self.total if self.total else 0.0

    def listen(self) -> asyncio.Event:
        """An event set on every change of this job (call on the event loop)."""
        event = asyncio.Event()
        self._listeners.add(event)
        if self.finished:
            event.set()
        return event

    def unlisten(self, event: asyncio.Event) -> None:
        self._listeners.discard(event)

    def notify(self) -> None:
        """From any thread: wakes the handlers listening on the event loop."""
        if self.finished:
            self._done.set()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # the loop closed meanwhile (server shutting down)
            pass

    def _wake(self) -> None:
        for event in list(self._listeners):
            event.set()

    async def wait(self) -> None:
        event = self.listen()
        try:
            while not self.finished:
                await event.wait()
                event.clear()
        finally:
            self.unlisten(event)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class JobQueue:
    def __init__(
        self,
        cache: PipelineCache,
        store: ImageStore,
        metrics: Metrics,
        queue_size: int,
        workers: int,
        kept_jobs: int,
    ):
        self.cache = cache
        self.store = store
        self.metrics = metrics
        self.queue_size = queue_size
        self.workers = workers
        self.kept_jobs = kept_jobs
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._running: dict[str, Job] = {}
        self._active: dict[str, Job] = {}  # queued and running, by id
        self._kept: OrderedDict[str, Job] = OrderedDict()  # finished job-API jobs, oldest first
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stop = threading.Event()

    # -- lifecycle

    def start(self) -> None:
        self._stopping = False
        self._stop.clear()
        for index in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"edgediff-worker-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)
        reaper = threading.Thread(target=self._reap, name="edgediff-idle-models", daemon=True)
        reaper.start()
        self._threads.append(reaper)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancels what is queued and running and waits for the workers to end."""
        with self._cond:
            self._stopping = True
            pending, self._pending = list(self._pending), deque()
            running = list(self._running.values())
            self._cond.notify_all()
        self._stop.set()
        for job in pending:
            self._finish_unstarted(job)
        for job in running:
            job.cancel_token.cancel()
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()

    # -- what handlers call

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) >= self.queue_size:
                self.metrics.rejected()
                raise ApiError(
                    429,
                    f"the queue is full ({len(self._pending)} jobs waiting, at most {self.queue_size}); retry later",
                    code="queue_full",
                    headers={"Retry-After": str(self._retry_after())},
                )
            self._pending.append(job)
            self._active[job.id] = job
            self._cond.notify()
        return job

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self._active.get(job_id) or self._kept.get(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """Cancels a job: a queued one is dropped at once, a running one stops within one denoiser call."""
        with self._cond:
            job = self._active.get(job_id) or self._kept.get(job_id)
            if job is None:
                return None
            queued = job.state == QUEUED
            if queued:
                self._pending.remove(job)
                self._active.pop(job.id, None)
        if queued:
            self._finish_unstarted(job)
        elif job.state == RUNNING:
            job.cancel_token.cancel()
        return job

    def running(self) -> list[Job]:
        with self._cond:
            return sorted(self._running.values(), key=lambda j: j.started or 0.0)

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._pending)

    # -- workers

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead times the recent seconds per image."""
        per_image = self.metrics.recent_seconds_per_image() or 1.0
        ahead = sum(job.request.n for job in self._pending)
        return max(1, min(MAX_RETRY_AFTER, math.ceil(per_image * ahead / self.workers)))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._pending.popleft()
                job.state, job.started = RUNNING, time.monotonic()
                self._running[job.id] = job
            job.notify()
            self._run(job)
            self._retire(job)

    def _run(self, job: Job) -> None:
        r = job.request
        try:
            with self.cache.lease(r.model) as pipe:
                began = time.perf_counter()
                out = pipe(
                    r.prompt,
                    negative_prompt=r.negative_prompt,
                    num_inference_steps=r.steps,
                    guidance_scale=r.guidance,
                    height=r.height,
                    width=r.width,
                    seed=r.seed,
                    num_images_per_prompt=r.n,
                    callback=lambda event: self._on_step(job, event),
                    preview=r.preview,
                    cancel=job.cancel_token,
                    image=r.image,
                    strength=r.strength if r.image is not None else None,
                    mask_image=r.mask,
                    keep_unmasked=r.mask is not None,  # outside the mask the original pixels stay exact
                    **r.text_arguments(),  # prompt_2, ..., true_cfg_scale, max_sequence_length: those given
                )
            results = []
            for index, (image, seed) in enumerate(zip(out.images, out.seeds)):
                data = encode(image, r.output_format, r.infotext(index))
                if job.store_results:
                    results.append(Result(seed, None, self.store.put(data, r.output_format)))
                else:
                    results.append(Result(seed, data, None))
            job.results = results
            job.compute_seconds = time.perf_counter() - began
            job.state = DONE
        except Cancelled:
            job.state = CANCELLED
            job.error = ApiError(409, f"job {job.id} was cancelled at step {job.step} of {job.total}", code="cancelled")
        except (InputError, ValueError) as exc:  # what the pipeline refuses that the request checks let through
            job.state, job.error = FAILED, ApiError(400, str(exc), code="invalid_value", param=_input_field(exc))
        except EdgediffError as exc:  # the bundle or the provider: the server's side, not the request's
            job.state = FAILED
            job.error = ApiError(503, f"model {r.model} cannot run here: {exc}", code="model_unavailable")
        except Exception:
            log.exception("job %s failed", job.id)
            job.state = FAILED
            job.error = ApiError(500, "internal error (the server log has the details)", code="server_error")
        finally:
            job.ended = time.monotonic()
            r.image = r.mask = None  # a kept job keeps its settings, not its uploads

    def _on_step(self, job: Job, event) -> None:
        job.step, job.total = event.step + 1, event.total
        if event.preview:
            job.preview = encode(event.preview[0], "png")
        job.notify()

    def _retire(self, job: Job) -> None:
        with self._cond:
            self._running.pop(job.id, None)
            self._active.pop(job.id, None)
            if job.keep:
                self._kept[job.id] = job
                while len(self._kept) > self.kept_jobs:
                    self._kept.popitem(last=False)
        if job.keep:
            job.preview = None  # kept jobs keep their results' names, not their pictures
        self.metrics.job_ended(job)
        job.notify()

    def _finish_unstarted(self, job: Job) -> None:
        job.state = CANCELLED
        job.ended = time.monotonic()
        job.error = ApiError(409, f"job {job.id} was cancelled before it started", code="cancelled")
        self._retire(job)

    def _reap(self) -> None:
        interval = min(5.0, max(0.05, self.cache.idle_seconds / 4))
        while not self._stop.wait(interval):
            try:
                self.cache.close_idle()
            except Exception:  # a failing close must not end the reaper (the next round tries again)
                log.exception("closing idle models failed")


def _input_field(exc: Exception) -> str | None:
    """The request field a refusal of the runtime is about (prompt_3 on a bundle without T5: prompt_3), or None."""
    if not isinstance(exc, InputError):
        return None
    if exc.key in ("prompt_encoder", "prompt_count"):
        return exc.fields.get("argument")
    return INPUT_ERROR_FIELDS.get(exc.key)
