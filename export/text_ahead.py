"""Text encoders quantised ahead: in a process of their own, while the denoiser's PyTorch export runs.

Exporting the UNet (PyTorch tracing it and serialising its graph) keeps one core busy and leaves the other idle for
half a minute (full-size SD-Turbo: 28-43 s on 2 cores), while quantising the text encoder after the recording cost
the fastest export about 13 s even beside the UNet's quantisation. A text encoder's calibration feeds need only the
prompts, its tokenizer and its own fp32 graph, all written by then (calibration.record_text_feeds), so its
quantisation runs there instead. In a process, not a thread: PyTorch's exporter holds Python's lock while it
serialises a graph, and a thread would wait for it. The process runs at a lower priority: the UNet's export is the
export's critical path, and the process is to take the core it leaves idle, not half of the one it uses.

Only for the UNet families (SD 1.x/2.x, SDXL), whose text conditioning is the runtime's TextConditioner, and only
where the process and the exports left fit in memory together (memory_plan.quantise_ahead). Transformer families'
text encoders (T5 at the call's length, Gemma's instruction prefix) are quantised after the recording, as is
everything where the process ends without its records (killed for memory, say).

The process is a fresh Python running this module's _main, not a multiprocessing child: that would run the
caller's own script again where it has no main guard, and cannot start from a daemonic process (a worker pool's).
It reads its work from stdin and ends when stdin closes, so it never outlives the export, however that ends.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from pathlib import Path

from .memory_plan import Weights, available_bytes, graph_largest, quantise_ahead

log = logging.getLogger("edgediff.export")

# The process's niceness on POSIX (below normal priority on Windows): the export's own process keeps its core.
NICENESS = 10


class TextAhead:
    """The process quantising text encoders ahead (`schemes`: name -> quantize.Scheme), each into
    `.quantized-{name}` in the bundle being written, as bundle_quantize.quantize_one does; `records` waits for it.
    A context manager: leaving it ends the process if it still runs (a failed or interrupted export)."""

    def __init__(self, staging: Path, conditioning: dict, specs: dict, schemes: dict, prompts, do_cfg, keep, since):
        self.names = list(schemes)
        self._staging = Path(staging)
        work = (str(staging), conditioning, specs, schemes, list(prompts), do_cfg, keep, since)
        # the parent's import path: the work function is found where the parent found it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._process = subprocess.Popen(
            # not `-m` on this module: the package imports it first, and runpy warns of running it a second time
            [sys.executable, "-c", "from edgediff.export.text_ahead import _main; _main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        try:
            self._process.stdin.write(pickle.dumps((_quantize_ahead, work, log.getEffectiveLevel())))
            self._process.stdin.flush()  # and left open: the process ends when it closes
        except OSError:  # it ended before it read its work: `records` says so
            pass
        self._records: dict | None = None
        self.text_runs: dict = {}  # calibration.TextRuns by encoder, once `records` has them

    def records(self) -> dict[str, dict]:
        """Each text encoder's quantisation record, once the process has quantised them all (waits for it); {} where
        it ended without them (killed), its work removed: they are then quantised with the other graphs. An error
        in the quantisation itself is raised here, as it would have been there."""
        if self._records is None:
            # until the process closes it, having written its answer or ended: not until it exits, which it does
            # at its lower priority while the export's own runs take both cores (a second of wall time)
            answer = self._process.stdout.read()
            try:
                outcome, value = pickle.loads(answer)  # the export's own child: not data from a bundle
            except Exception:  # nothing, or cut short: it was killed
                self._process.wait()
                outcome, value = "ended", ({}, {})
                log.warning(
                    "the text encoders' quantisation process ended with code %s: quantising them after the recording",
                    self._process.returncode,
                )
                for name in self.names:
                    shutil.rmtree(self._staging / f".quantized-{name}", ignore_errors=True)
            if outcome == "error":
                raise value
            self._records, self.text_runs = value
        return self._records

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        for pipe in (self._process.stdin, self._process.stdout):
            try:
                pipe.close()
            except OSError:  # stdin's last write refused: the process had gone
                continue

    def __enter__(self) -> TextAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(
    staging: Path,
    conditioning: dict,
    written: dict,
    exports_left: dict[str, Weights],
    policy: dict,
    prompts,
    do_cfg: bool,
    keep,
    since: float | None = None,
    slotted=(),
) -> TextAhead | None:
    """A TextAhead for the text encoders the policy quantises, where every encoder of the UNet's text `conditioning`
    is `written` (name -> ComponentSpec) and the UNet is among `exports_left` (name -> Weights, the components not
    exported yet; `slotted`: those that get LoRA slots); None where that is not so, or where the memory plan says the
    process and those exports would not fit together (memory_plan.quantise_ahead). `since`: the export's start
    (time.time()), which the process's logged stages count from."""
    from .quantize import SCHEMES

    encoders = [e["component"] for e in conditioning.get("encoders", [])]
    if "unet" not in exports_left or not encoders or any(e not in written for e in encoders):
        return None
    names = [e for e in encoders if policy.get(e)]
    if not names:
        return None
    graphs = {n: (written[n].size, policy[n], graph_largest(staging / written[n].graph_file)) for n in names}
    if not quantise_ahead(graphs, exports_left, available_bytes(), slotted):
        log.info("the text encoders are quantised after the recording: beside the UNet's export they may not fit")
        return None
    log.info("quantising %s while the remaining graphs are exported", ", ".join(names))
    schemes = {n: SCHEMES[policy[n]] for n in names}
    try:
        return TextAhead(staging, conditioning, {n: written[n] for n in names}, schemes, prompts, do_cfg, keep, since)
    except OSError as exc:  # no process to be had: they are quantised after the recording
        log.warning("the text encoders are quantised after the recording: %s", exc)
        return None


def _quantize_ahead(staging: str, conditioning: dict, specs: dict, schemes: dict, prompts, do_cfg, keep, since):
    """The process's work: the encoders' feeds recorded, each quantised in turn; returns ("done", (records, each
    encoder's calibration.TextRuns)) or ("error", exception). Its stages go to the export's stages log
    (progress.STAGES_LOG_ENV, inherited)."""
    try:
        from .bundle_quantize import quantize_one
        from .calibration import record_text_feeds
        from .progress import Stages

        stages = Stages(enabled=False, since=since)
        with stages.stage(f"{', '.join(schemes)}: calibration inputs"):
            feeds, runs = record_text_feeds(Path(staging), conditioning, specs, list(schemes), prompts, do_cfg)
        records = {
            name: quantize_one(Path(staging), specs[name].graph_file, name, scheme, feeds.pop(name), keep, stages)
            for name, scheme in schemes.items()
        }
    except Exception as exc:
        return "error", _sendable(exc)
    return "done", (records, runs)


def _sendable(exc: BaseException) -> BaseException:
    """`exc` with its traceback in this process as a note, where it survives pickling (edgediff's errors do), else a
    RuntimeError telling it in words."""
    told = "".join(traceback.format_exception(exc))
    try:
        exc.add_note(f"in the text encoders' quantisation process:\n{told}")
        return pickle.loads(pickle.dumps(exc))
    except Exception:  # any error pickling raises: the exception is then told in words
        return RuntimeError(f"the text encoders' quantisation failed:\n{told}")


def _lower_priority() -> None:
    if hasattr(os, "nice"):
        os.nice(NICENESS)
        return
    try:
        import psutil  # optional: Windows' priority classes
    except ImportError:
        return
    psutil.Process().nice(psutil.BELOW_NORMAL_PRIORITY_CLASS)


def _end_with_the_export() -> None:
    sys.stdin.buffer.read()  # returns when the export closes its end, or has ended
    os._exit(1)


def _main() -> None:
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything else written to stdout (a library's print) goes to stderr, not into the answer
    work, args, level = pickle.load(sys.stdin.buffer)  # from the export that started this process
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the export's to handle: it ends this process
    logging.basicConfig(level=level, format="%(message)s")
    threading.Thread(target=_end_with_the_export, daemon=True).start()
    _lower_priority()
    answer.write(pickle.dumps(work(*args)))
    answer.close()
    # nothing is left to write: no interpreter teardown (its sessions and arrays freed one by one, at a lower
    # priority), the memory returned to the system at once
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)
