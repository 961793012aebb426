"""Which models a server serves (catalogue names only) and their pipelines: opened on first use, shared by
the workers, closed after an idle time so that an unused model gives its memory back."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from edgediff.runtime import Pipeline, RuntimeOptions, list_bundles
from edgediff.runtime.catalog import BundleEntry

from .config import ServerConfigError
from .errors import ApiError

log = logging.getLogger("edgediff.server")

MAX_NAME_CHARS = 128


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a catalogue name, or None. Names are folder names: anything that could walk
    out of the models folder (a separator, `..`) is refused before any lookup."""
    if not isinstance(name, str) or not name:
        return "a model name is a non-empty string"
    if len(name) > MAX_NAME_CHARS:
        return f"a model name has at most {MAX_NAME_CHARS} characters"
    if "/" in name or "\\" in name or ".." in name or "\0" in name or name.startswith("."):
        return f"model {name!r} is a path; models are named as `edgediff list` shows them (no path separators)"
    return None


class ModelCatalog:
    """The bundles this server may open, by name, from the catalogue (`list_bundles()`); fixed at start."""

    def __init__(self, names: tuple[str, ...] = ()):
        readable = {e.name: e for e in list_bundles() if e.manifest is not None}
        for name in names:
            problem = name_problem(name)
            if problem:
                raise ServerConfigError(problem)
            if name not in readable:
                raise ServerConfigError(
                    f"no readable bundle named {name!r} in the catalogue (available: {', '.join(readable) or 'none'})"
                )
        self.entries: dict[str, BundleEntry] = {n: readable[n] for n in (names or readable)}
        if not self.entries:
            raise ServerConfigError("no readable bundle to serve (see `edgediff list`)")
        self.default = next(iter(self.entries))

    def names(self) -> list[str]:
        return list(self.entries)

    def get(self, name: str | None) -> BundleEntry:
        """The entry for a client's model name (None: the default model); a clear 400 or 404 otherwise."""
        if name is None:
            return self.entries[self.default]
        problem = name_problem(name)
        if problem:
            raise ApiError(400, problem, code="invalid_model", param="model")
        entry = self.entries.get(name)
        if entry is None:
            raise ApiError(
                404,
                f"model {name!r} is not served here; available: {', '.join(self.entries)} (GET /v1/models)",
                code="model_not_found",
                param="model",
            )
        return entry


@dataclass
class _Slot:
    pipe: Pipeline | None = None
    users: int = 0
    last_used: float = 0.0
    opening: threading.Lock = None  # one thread opens a model; the others wait for it

    def __post_init__(self):
        self.opening = threading.Lock()


class PipelineCache:
    """One Pipeline per model (a Pipeline is safe to call from several threads), opened lazily."""

    def __init__(self, catalog: ModelCatalog, options: RuntimeOptions, idle_seconds: float, clock=time.monotonic):
        self.catalog = catalog
        self.options = options
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._slots = {name: _Slot() for name in catalog.names()}
        self.opened = {name: 0 for name in catalog.names()}  # times each was opened (metrics)

    @contextmanager
    def lease(self, name: str):
        """The model's pipeline, kept open while leased."""
        slot = self._slots[name]
        with slot.opening:
            with self._lock:
                pipe = slot.pipe
                if pipe is not None:
                    slot.users += 1
            if pipe is None:
                # the catalogue's own path for the name, never a client's string (nor a folder in the cwd)
                pipe = Pipeline.from_bundle(self.catalog.entries[name].path, self.options)
                log.info("opened model %s", name)
                with self._lock:
                    slot.pipe, slot.users = pipe, slot.users + 1
                    self.opened[name] += 1
        try:
            yield pipe
        finally:
            with self._lock:
                slot.users -= 1
                slot.last_used = self.clock()

    def close_idle(self) -> list[str]:
        """Closes the pipelines nobody used for idle_seconds; returns their names."""
        closing = []
        now = self.clock()
        with self._lock:
            for name, slot in self._slots.items():
                if slot.pipe is not None and slot.users == 0 and now - slot.last_used >= self.idle_seconds:
                    closing.append((name, slot.pipe))
                    slot.pipe = None
        for name, pipe in closing:
            pipe.close()
            log.info("closed model %s (idle %.0f s)", name, self.idle_seconds)
        return [name for name, _ in closing]

    def close_all(self) -> None:
        with self._lock:
            pipes = [slot.pipe for slot in self._slots.values() if slot.pipe is not None]
            for slot in self._slots.values():
                slot.pipe = None
        for pipe in pipes:
            pipe.close()

    def loaded(self) -> list[str]:
        with self._lock:
            return [name for name, slot in self._slots.items() if slot.pipe is not None]
