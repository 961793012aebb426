"""An on-disk cache of onnxruntime-optimised graphs, so that the second start skips the optimiser.

onnxruntime can save the graph it optimised (fusions, constant folding, layout changes) and load it
back with optimisation off. The saved graph may suit only this machine and provider, so the key is
the graph's sha256 (from the manifest) with the file's size and mtime, the provider, onnxruntime's
version and the CPU architecture. Files live in platformdirs' per-user cache folder (EDGEDIFF_CACHE_DIR overrides); a
cached graph that fails to load is deleted and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger("edgediff.cache")

CACHE_DIR_ENV = "EDGEDIFF_CACHE_DIR"
EXTERNAL_MIN_BYTES = 1024  # initializers at least this big go to the .data file (graphs past 2 GB need it)
LARGE_GRAPH_BYTES = 1_500_000_000  # above this a graph's cached copy keeps its weights beside it


def cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    from platformdirs import user_cache_path

    return user_cache_path("edgediff", appauthor=False) / "graphs"


def cache_key(component: str, sha256: str, provider: str, path: Path) -> str:
    """The manifest's sha256 names the graph; the file's size and mtime tie the entry to the file on
    disk too, so a bundle opened without checksum verification never gets another file's graph."""
    stat = path.stat()
    stamp = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    return f"{component}-{sha256[:16]}-{stamp}-{provider}-ort{ort.__version__}-{platform.machine().lower()}"


def open_cached(path: Path, key: str, graph_bytes: int, options_factory, providers, folder: Path):
    """(session, "hit" | "miss"): the cached optimised graph if there is one, else `path` optimised
    now and saved for next time."""
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / f"{key}.onnx"
    if cached.is_file():
        opts = options_factory()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimised
        try:
            return ort.InferenceSession(str(cached), sess_options=opts, providers=providers), "hit"
        except Exception as exc:  # onnxruntime's own error types: a truncated or stale file
            log.warning("cached graph %s is unusable (%s); rebuilding it", cached.name, str(exc).splitlines()[0])
            for stale in (cached, cached.with_suffix(".onnx.data")):
                stale.unlink(missing_ok=True)
    partial = folder / f".{key}.{os.getpid()}.partial.onnx"
    opts = options_factory()
    opts.optimized_model_filepath = str(partial)
    if graph_bytes > LARGE_GRAPH_BYTES:
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{key}.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                      str(EXTERNAL_MIN_BYTES))
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if partial.is_file():
        os.replace(partial, cached)  # whole or absent: a crash mid-write leaves only a .partial file
        log.info("cached optimised %s as %s", path.name, cached.name)
    return session, "miss"
