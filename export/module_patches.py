"""Library functions replaced while some thread needs them replaced.

The exporter swaps a few of onnxruntime's quantisation functions for its own while it quantises (weight_quant.py,
stream_quant.py), and it quantises graphs side by side on threads (bundle_quantize.quantize_bundle). A swap saved and
restored around each use would let the first thread out restore the originals under a thread still quantising. Here
the first thread in installs a swap and the last one out restores it; what each thread wants of it (the folder its
weights lie in, say) is a context variable the replacement reads, so another thread's call is its own.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

_lock = threading.Lock()
_active: dict[str, list] = {}  # key -> [threads inside, the originals]


@contextmanager
def patched(key: str, targets: list[tuple[object, str]], replacements: Callable[[list], list]):
    """While the block runs, each (module or class, attribute name) of `targets` holds the matching item of
    `replacements(originals)`, with the same swap for every thread inside a block of this `key`."""
    with _lock:
        entry = _active.get(key)
        if entry is None:
            originals = [getattr(owner, name) for owner, name in targets]
            for (owner, name), replacement in zip(targets, replacements(originals)):
                setattr(owner, name, replacement)
            entry = _active[key] = [0, originals]
        entry[0] += 1
    try:
        yield
    finally:
        with _lock:
            entry[0] -= 1
            if entry[0] == 0:
                for (owner, name), original in zip(targets, entry[1]):
                    setattr(owner, name, original)
                del _active[key]
