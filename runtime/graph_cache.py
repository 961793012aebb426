"""An on-disk cache of onnxruntime-optimized graphs, so that the second start skips the optimizer.

onnxruntime can save the graph it optimized (fusions, constant folding, layout changes) and load it
back with optimization off. The saved graph may suit only this machine and provider, so the key is
the graph's sha256 (from the manifest) with the file's size and mtime, the provider, onnxruntime's
version, the CPU architecture and its kernel-deciding instruction sets (a graph optimized where AVX-512 is, its
convolutions laid out in 16-channel blocks, fails where only AVX2 is: a cache copied with a disk image or a home
folder, or a VM moved to another host). Files live in platformdirs' per-user cache folder (EDGEDIFF_CACHE_DIR overrides); a
cached graph that fails to load is deleted and rebuilt.

The cache stays bounded, because each new bundle file, provider option set or onnxruntime upgrade adds entries
(an unbounded one once filled a disk and failed CI's install): after each save the least recently used entries
go until the total is under the limit (EDGEDIFF_CACHE_MAX_GB), a save that would leave the disk nearly full is
skipped, and a save that fails leaves the session running uncached. The cache never makes a generation fail.
Compiling providers' own caches live in folders beside ours (providers.py `cache_option`), listed, evicted and
cleared with the rest.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import platform
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from .cpu_features import kernel_tag
from .errors import InputError
from .provider_loading import new_session
from .providers import REGISTRY
from .session_states import CacheStatus

log = logging.getLogger("edgediff.cache")

CACHE_DIR_ENV = "EDGEDIFF_CACHE_DIR"
# A cached graph keeps its weights in a .data file beside it, whatever its size: graphs past 2 GB need that, and
# onnxruntime reads weights from a file faster, and with a lower peak, than it parses them inline from protobuf
# (docs/benchmarks.md). The .data name carries a token of its save: two processes saving the same graph at once
# never write into one file.
EXTERNAL_MIN_BYTES = 1024  # initializers at least this big go to the .data file
LIMIT_ENV = "EDGEDIFF_CACHE_MAX_GB"
# Room for the optimized graphs of a few full-size models (README.md gives one's size). An evicted graph costs one
# slower start (optimize and save again).
DEFAULT_LIMIT_BYTES = 20 * 2**30
FREE_SPACE_RESERVE = 2 * 2**30  # a save must leave this much of the disk free: the cache never fills a disk
STALE_PARTIAL_S = (
    3600  # a .partial file untouched this long is a crashed save (a live one's mtime moves as it is written)
)
# What `clear` and eviction may delete: only names this module writes, so that EDGEDIFF_CACHE_DIR pointing at a
# folder of the user's own never loses anything else
_ENTRY_FILE = re.compile(
    r"^(?P<key>[a-z0-9_]+-[0-9a-f]{16}-[0-9a-f]{8}-.+-ort[^-]+-[a-z0-9_]+(?:-[0-9a-f]{8})?)"
    r"\.onnx(?:(?:\.[0-9a-f]{8})?\.data)?$"
)
_PARTIAL_FILE = re.compile(r"^\.[a-z0-9_]+-[0-9a-f]{16}-.+\.\d+\.partial\.onnx(\.data)?$")

_PRUNING = threading.Lock()  # a pipeline opens its graphs in parallel: one eviction pass at a time


def cache_dir() -> Path:
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override)
    from platformdirs import user_cache_path

    return user_cache_path("edgediff", appauthor=False) / "graphs"


def provider_folders() -> frozenset[str]:
    """The folders compiling providers keep their own caches in, beside our entries (providers.py `cache_option`)."""
    return frozenset(p.cache_folder for p in REGISTRY.values() if p.cache_folder)


def cache_limit() -> int:
    """The cache's size limit in bytes, from EDGEDIFF_CACHE_MAX_GB (GiB; 0 keeps only the graphs just saved)."""
    raw = os.environ.get(LIMIT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_LIMIT_BYTES
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses nan
        raise InputError("cache_limit", env=LIMIT_ENV, value=raw)
    return int(value * 2**30)


@dataclass(frozen=True)
class Entry:
    """One cached graph (its .onnx and the .data files of its weights) or one compiling provider's folder."""

    name: str
    paths: tuple[Path, ...]
    size: int
    last_used: float  # seconds since the epoch: the newest mtime among its files (a hit refreshes it)


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:  # another process evicted it meanwhile
        return None


def _folder_stats(folder: Path) -> tuple[int, float]:
    size, newest = 0, folder.stat().st_mtime
    for root, _dirs, files in os.walk(folder):
        for stat in filter(None, (_stat(Path(root) / name) for name in files)):
            size, newest = size + stat.st_size, max(newest, stat.st_mtime)
    return size, newest


def entries(folder: Path) -> list[Entry]:
    """What the cache at `folder` holds, least recently used first."""
    if not folder.is_dir():
        return []
    grouped: dict[str, list[Path]] = {}
    found = []
    own_caches = provider_folders()
    for path in folder.iterdir():
        match = _ENTRY_FILE.match(path.name)
        if match and path.is_file():
            grouped.setdefault(match["key"], []).append(path)
        elif path.name in own_caches and path.is_dir():
            size, used = _folder_stats(path)
            found.append(Entry(path.name + "/", (path,), size, used))
    for key, paths in grouped.items():
        stats = [st for st in map(_stat, paths) if st is not None]
        if stats:
            found.append(
                Entry(key, tuple(sorted(paths)), sum(st.st_size for st in stats), max(st.st_mtime for st in stats))
            )
    return sorted(found, key=lambda e: e.last_used)


def _key_files(folder: Path, key: str) -> list[Path]:
    """A cached graph's files: its .onnx and every .data file saved for it."""
    return [p for p in folder.glob(glob.escape(key) + ".onnx*") if (m := _ENTRY_FILE.match(p.name)) and m["key"] == key]


def _remove(entry: Entry) -> bool:
    """Deletes an entry's files; False where one stays (Windows keeps a file another process has open)."""
    whole = True
    for path in entry.paths:
        try:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.info("could not remove cached %s (%s); it stays until its user closes it", path.name, exc)
            whole = False
    return whole


def _discard(*paths: Path) -> None:
    """Deletes what a save that did not finish left (files only)."""
    _remove(Entry("", tuple(p for p in paths if p.is_file()), 0, 0.0))


def clear(folder: Path) -> tuple[int, int]:
    """Removes every cache entry and stale partial save under `folder`; (entries, bytes) removed."""
    removed = [entry for entry in entries(folder) if _remove(entry)]
    _remove_partials(folder, older_than=0)
    return len(removed), sum(e.size for e in removed)


def _remove_partials(folder: Path, older_than: float) -> None:
    now = time.time()
    for path in folder.glob(".*.partial.onnx*"):
        stat = _stat(path) if _PARTIAL_FILE.match(path.name) and path.is_file() else None
        if stat is not None and now - stat.st_mtime >= older_than:
            _remove(Entry(path.name, (path,), 0, 0.0))


def prune(folder: Path, limit: int, keep: frozenset[str] = frozenset()) -> list[Entry]:
    """Evicts least recently used entries until the total is within `limit` bytes, never those named in `keep`
    (the graphs a session just saved); also drops partial saves a crash left. Returns what it evicted."""
    _remove_partials(folder, older_than=STALE_PARTIAL_S)
    found = entries(folder)
    total, evicted = sum(e.size for e in found), []
    for entry in found:
        if total <= limit:
            break
        if entry.name in keep or not _remove(entry):
            continue
        total -= entry.size
        evicted.append(entry)
    if evicted:
        log.info(
            "graph cache over its %.1f GiB limit (%s): evicted %d least recently used entries (%.1f MiB)",
            limit / 2**30,
            LIMIT_ENV,
            len(evicted),
            sum(e.size for e in evicted) / 2**20,
        )
    return evicted


def cache_key(component: str, sha256: str, provider: str, path: Path) -> str:
    """The manifest's sha256 names the graph; the file's size and mtime tie the entry to the file on
    disk too, so a bundle opened without checksum verification never gets another file's graph."""
    stat = path.stat()
    stamp = hashlib.sha1(f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    machine = f"{platform.machine().lower()}-{kernel_tag()}"
    return f"{component}-{sha256[:16]}-{stamp}-{provider}-ort{ort.__version__}-{machine}"


def open_cached(path: Path, key: str, graph_bytes: int, options_factory, providers, folder: Path, save: str = "graph"):
    """(session, status): the cached optimized graph if there is one (HIT), else `path` optimized now and
    saved for next time (MISS), or run unsaved when the disk is short of room or the save fails (SKIPPED).
    save="context": what a compiling provider compiled, as an EPContext model (QNN), instead of onnxruntime's
    optimized graph, which it cannot write for compiled nodes."""
    limit = cache_limit()  # read first: a bad EDGEDIFF_CACHE_MAX_GB is an error even on a hit

    def uncached():  # the graph optimized now and not saved
        return new_session(path, options_factory(), providers)

    cached = folder / f"{key}.onnx"
    if cached.is_file():
        opts = options_factory()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # already optimized
        try:
            session = new_session(cached, opts, providers)
        except Exception as exc:  # onnxruntime's own error types: a truncated or stale file
            log.warning("cached graph %s is unusable (%s); rebuilding it", cached.name, str(exc).splitlines()[0])
            _remove(Entry(key, tuple(_key_files(folder, key)), 0, 0.0))
        else:
            os.utime(cached)  # marks the use for eviction: access times are often off (noatime, relatime)
            return session, CacheStatus.HIT
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
    except OSError as exc:  # an unwritable or vanished cache folder costs speed, never the image
        log.warning("graph cache folder %s is unusable (%s); %s runs uncached", folder, exc, path.name)
        return uncached(), CacheStatus.SKIPPED
    if free - graph_bytes < FREE_SPACE_RESERVE:
        log.warning(
            "not caching %s: %.1f GiB free at %s, and a save must leave %.0f GiB",
            path.name,
            free / 2**30,
            folder,
            FREE_SPACE_RESERVE / 2**30,
        )
        return uncached(), CacheStatus.SKIPPED
    partial = folder / f".{key}.{os.getpid()}.partial.onnx"
    weights = folder / f"{key}.onnx.{secrets.token_hex(4)}.data"  # named in the saved graph, relative to it
    opts = options_factory()
    if save == "context":
        # one file, the compiled binary inside it, so that it is replaced whole (beside it, the binary's name would
        # follow the partial file's)
        opts.add_session_config_entry("ep.context_enable", "1")
        opts.add_session_config_entry("ep.context_file_path", str(partial))
        opts.add_session_config_entry("ep.context_embed_mode", "1")
    else:
        opts.optimized_model_filepath = str(partial)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", weights.name)
        opts.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", str(EXTERNAL_MIN_BYTES)
        )
    try:
        session = new_session(path, opts, providers)
    except Exception as exc:  # onnxruntime's own types; the save (disk full, folder gone) or the graph itself
        _discard(partial, weights)
        # loaded again without the save: a broken graph raises here as it would uncached
        session = uncached()
        log.warning("could not save the optimized %s (%s); it runs uncached", path.name, str(exc).splitlines()[0])
        return session, CacheStatus.SKIPPED
    if not partial.is_file():
        return session, CacheStatus.SKIPPED
    # whole or absent: a crash mid-write leaves only a .partial file (and a .data file no graph names, which
    # goes with its entry); a graph saved meanwhile by another process is replaced by this one, whole
    try:
        os.replace(partial, cached)
    except OSError as exc:  # Windows: another process has that graph open; its copy stays, this one goes
        log.warning("could not keep the optimized %s (%s); the cached copy stays as it was", path.name, exc)
        _discard(partial, weights)
        return session, CacheStatus.SKIPPED
    log.info("cached %s %s as %s", "compiled" if save == "context" else "optimized", path.name, cached.name)
    try:
        with _PRUNING:
            prune(folder, limit, keep=frozenset({key}))
    except OSError as exc:  # the folder changed under us (another process): the next save prunes again
        log.warning("graph cache eviction stopped (%s)", exc)
    return session, CacheStatus.MISS
