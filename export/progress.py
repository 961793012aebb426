"""One progress bar over an export's stages, with the time left.

Stages are planned up front with a weight each (their rough cost: a graph's parameter count times what the
stage does with it), so that tqdm's rate, and so its estimate of the time left, averages over unlike stages.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from contextlib import contextmanager

# A file to append one JSON line per finished stage to (its seconds, when it ended and the process's peak memory so
# far), and one with the memory plan's estimate: how benchmarks/export_cost.py learns what each stage of an export in
# another process cost, and what it was expected to (it samples the process's memory from outside: ended_at, on the
# wall clock, places each stage among its samples).
STAGES_LOG_ENV = "EDGEDIFF_EXPORT_STAGES"

# Rough cost per million parameters of each stage, relative to exporting a graph (estimates for full-size
# graphs, where the bar's time left matters); runs scale with the feeds.
STAGE_COST = {
    "export": 1.0,
    "check": 0.3,  # on a reduced grid (specs.check_context)
    "record": 0.05,  # per prompt: the whole fp32 pipeline, sized by all its graphs
    "calibrate": 0.05,  # per feed
    "sensitivity": 0.5,  # per feed whose block boundaries are recorded: blocks quantised, groups measured
    "quantize": 0.5,
    "final check": 0.03,  # per feed
}


class Stages:
    """A tqdm bar whose steps are named, weighted stages; a stage not planned shows its name and counts for
    nothing (an extra whole-graph check, say). `since`: when the export began (time.time()), for the stages of
    another process of its own (text_ahead.py), which log when they ended counted from then, and no high-water mark
    (a child's starts from its parent's, and the export's peak is the two together: export_cost samples it)."""

    def __init__(self, enabled: bool = True, desc: str = "export", since: float | None = None):
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=0,
            desc=desc,
            disable=not enabled,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
        )
        self._planned: dict[str, float] = {}
        self._log = os.environ.get(STAGES_LOG_ENV) or None
        self._lock = threading.Lock()  # stages of graphs quantised side by side end on two threads
        # the export's start on this process's clock (another process of the export's: its start, told)
        self._start = time.perf_counter() - (0.0 if since is None else time.time() - since)
        self._side_process = since is not None

    @property
    def started_at(self) -> float:
        """When the export began (time.time()): another process's Stages `since`."""
        return time.time() - (time.perf_counter() - self._start)

    def plan(self, name: str, weight: float) -> None:
        weight = max(float(weight), 1e-3)
        self._planned[name] = self._planned.get(name, 0.0) + weight
        self._bar.total += weight
        self._bar.refresh()

    def replan(self, name: str, seconds: float, add: bool = False) -> None:
        """Re-weighs a stage not yet run as `seconds` at the rate the bar has gone so far (`add`: on top of its
        planned weight), once what it will cost is known better than its plan said (a graph's measured run
        time against its parameter count)."""
        if name not in self._planned or self._bar.n <= 0:
            return
        rate = self._bar.n / max(time.perf_counter() - self._start, 1e-6)  # weight per second so far
        weight = max(float(seconds) * rate, 1e-3) + (self._planned[name] if add else 0.0)
        self._bar.total += weight - self._planned[name]
        self._planned[name] = weight
        self._bar.refresh()

    @contextmanager
    def stage(self, name: str):
        self._bar.set_postfix_str(name)
        start = time.perf_counter()
        yield
        self._bar.update(self._planned.pop(name, 0.0))
        if self._log:
            now = time.perf_counter()
            record = {
                "stage": name,
                "seconds": round(now - start, 3),
                # seconds since the export began: stages run side by side (graphs quantised on two threads) overlap,
                # so what a span of them took is read from when they ended, not from their sum
                "ended": round(now - self._start, 3),
                "ended_at": round(time.time(), 3),
                "peak_rss_bytes": None if self._side_process else _peak_rss(),
                **({"side_process": True} if self._side_process else {}),
            }
            with self._lock, open(self._log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def run_elsewhere(self, prefix: str) -> None:
        """Counts the planned stages named `prefix`... as done: another process ran them (text_ahead.py), and logged
        them itself where it was told to."""
        for name in [n for n in self._planned if n.startswith(prefix)]:
            self._bar.update(self._planned.pop(name))

    def close(self, note: str = "done") -> None:
        self._bar.set_postfix_str(note)
        self._bar.update(self._bar.total - self._bar.n)
        self._bar.close()


def log_estimate(stages) -> None:
    """Writes the memory plan's estimate (memory_plan.Stage list) to the stages log, when one is asked for, so that
    export_cost sets each estimate beside what was measured."""
    log = os.environ.get(STAGES_LOG_ENV)
    if log and stages:
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps({"estimate": [{"stage": s.name, "bytes": s.bytes} for s in stages]}) + "\n")


class NoStages:
    """Stages that show nothing (library calls without a bar)."""

    def plan(self, name: str, weight: float) -> None:
        pass

    def replan(self, name: str, seconds: float, add: bool = False) -> None:
        pass

    @contextmanager
    def stage(self, name: str):
        yield

    def run_elsewhere(self, prefix: str) -> None:
        pass

    def close(self, note: str = "done") -> None:
        pass


def _peak_rss() -> int | None:
    """This process's peak resident memory so far, in bytes: the stage that raised it set the export's peak."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux
