"""Counters the server keeps, rendered in Prometheus' text format at /metrics."""

from __future__ import annotations

import os
import threading
from collections import Counter, defaultdict, deque

RECENT = 32  # jobs the "recent seconds per image" (Retry-After) averages over


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.images = Counter()  # model -> images served
        self.seconds = defaultdict(float)  # model -> seconds spent generating them
        self.jobs = Counter()  # (model, state) -> jobs ended
        self.rejected_total = 0  # requests answered 429 (queue full)
        self._recent: deque[float] = deque(maxlen=RECENT)

    def rejected(self) -> None:
        with self._lock:
            self.rejected_total += 1

    def job_ended(self, job) -> None:
        model = job.request.model
        with self._lock:
            self.jobs[model, job.state] += 1
            if job.state == "done":
                seconds = job.compute_seconds
                self.images[model] += len(job.results)
                self.seconds[model] += seconds
                self._recent.append(seconds / max(1, len(job.results)))

    def recent_seconds_per_image(self) -> float | None:
        with self._lock:
            return sum(self._recent) / len(self._recent) if self._recent else None

    def render(self, models: list[str], queue, cache, store) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        with self._lock:
            images, seconds, jobs, rejected = (
                dict(self.images),
                dict(self.seconds),
                dict(self.jobs),
                self.rejected_total,
            )
        loaded = set(cache.loaded())
        stored_count, stored_bytes = store.size
        lines = [
            "# HELP edgediff_queue_depth Jobs waiting for a worker.",
            "# TYPE edgediff_queue_depth gauge",
            f"edgediff_queue_depth {queue.depth}",
            "# HELP edgediff_queue_capacity Jobs that may wait before requests are refused (429).",
            "# TYPE edgediff_queue_capacity gauge",
            f"edgediff_queue_capacity {queue.queue_size}",
            "# HELP edgediff_jobs_running Jobs being generated now.",
            "# TYPE edgediff_jobs_running gauge",
            f"edgediff_jobs_running {len(queue.running())}",
            "# HELP edgediff_requests_rejected_total Requests refused because the queue was full.",
            "# TYPE edgediff_requests_rejected_total counter",
            f"edgediff_requests_rejected_total {rejected}",
            "# HELP edgediff_images_served_total Images generated and returned, per model.",
            "# TYPE edgediff_images_served_total counter",
            *(f'edgediff_images_served_total{{model="{m}"}} {images.get(m, 0)}' for m in models),
            "# HELP edgediff_generation_seconds_total Seconds spent generating the served images, per model.",
            "# TYPE edgediff_generation_seconds_total counter",
            *(f'edgediff_generation_seconds_total{{model="{m}"}} {seconds.get(m, 0.0):.6f}' for m in models),
            "# HELP edgediff_seconds_per_image Mean seconds per served image, per model (NaN before the first).",
            "# TYPE edgediff_seconds_per_image gauge",
            *(
                f'edgediff_seconds_per_image{{model="{m}"}} '
                + (f"{seconds[m] / images[m]:.6f}" if images.get(m) else "NaN")
                for m in models
            ),
            "# HELP edgediff_jobs_total Jobs ended, per model and final state.",
            "# TYPE edgediff_jobs_total counter",
            *(f'edgediff_jobs_total{{model="{m}",state="{s}"}} {n}' for (m, s), n in sorted(jobs.items())),
            "# HELP edgediff_model_loaded Whether the model's pipeline is open (closed after an idle time).",
            "# TYPE edgediff_model_loaded gauge",
            *(f'edgediff_model_loaded{{model="{m}"}} {int(m in loaded)}' for m in models),
            "# HELP edgediff_model_opens_total Times the model's pipeline was opened.",
            "# TYPE edgediff_model_opens_total counter",
            *(f'edgediff_model_opens_total{{model="{m}"}} {cache.opened.get(m, 0)}' for m in models),
            "# HELP edgediff_stored_images Images held for URL responses (bounded in bytes).",
            "# TYPE edgediff_stored_images gauge",
            f"edgediff_stored_images {stored_count}",
            "# TYPE edgediff_stored_image_bytes gauge",
            f"edgediff_stored_image_bytes {stored_bytes}",
        ]
        rss = resident_bytes()
        if rss is not None:
            lines += [
                "# HELP process_resident_memory_bytes Resident memory of the server process.",
                "# TYPE process_resident_memory_bytes gauge",
                f"process_resident_memory_bytes {rss}",
            ]
        return "\n".join(lines) + "\n"


def resident_bytes() -> int | None:
    """Resident memory now, where /proc says it (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
