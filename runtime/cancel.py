"""Cancelling a generation from another thread (a GUI's Cancel button).

A token stops the pipeline before its next denoiser call and also aborts the onnxruntime call in
flight (RunOptions.terminate), so a cancel lands within one denoiser call even on a slow machine.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import onnxruntime as ort


class CancelToken:
    """Pass to `Pipeline.__call__(cancel=...)`; call `cancel()` from any thread. Reusable after `reset()`."""

    def __init__(self):
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._active: set[ort.RunOptions] = set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            for options in self._active:
                options.terminate = True

    def reset(self) -> None:
        self._event.clear()

    @contextmanager
    def run_options(self):
        """RunOptions for one onnxruntime call, terminated if the token is cancelled meanwhile."""
        options = ort.RunOptions()
        with self._lock:
            options.terminate = self._event.is_set()
            self._active.add(options)
        try:
            yield options
        finally:
            with self._lock:
                self._active.discard(options)
