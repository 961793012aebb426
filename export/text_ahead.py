"""Text encoders quantised ahead: in a process of their own, while the denoiser's PyTorch export runs.

Exporting the UNet (PyTorch tracing it and serialising its graph) keeps one core busy and leaves the other idle for
half a minute and more (full-size SD-Turbo: 31-39 s on 2 cores), while quantising the text encoder after the
recording cost the fastest export about 13 s even beside the UNet's quantisation. A text encoder's calibration
feeds need only the prompts, its tokenizer and its own fp32 graph, all written by then (calibration.
record_text_feeds), so its quantisation runs there instead. In a process, not a thread: PyTorch's exporter holds
Python's lock while it serialises a graph, and a thread would wait for it.

Only for the UNet families (SD 1.x/2.x, SDXL), whose text conditioning is the runtime's TextConditioner, and only
where the quantisation and the exports left fit in memory together (memory_plan.quantise_ahead). Transformer
families' text encoders (T5 at the call's length, Gemma's instruction prefix) are quantised after the recording, as
is everything where this process cannot give its records back (killed for memory, say).
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import traceback
from pathlib import Path

from .memory_plan import Weights, available_bytes, graph_largest, quantise_ahead

log = logging.getLogger("edgediff.export")

# the process Python starts afresh: a fork of the exporter would copy a process holding PyTorch's threads
START_METHOD = "spawn"


class TextAhead:
    """The process quantising text encoders ahead (`schemes`: name -> quantize.Scheme), each into
    `.quantized-{name}` in the bundle being written, as bundle_quantize.quantize_one does; `records` waits for it.
    A context manager: leaving it ends the process if it still runs (a failed or interrupted export)."""

    def __init__(self, staging: Path, conditioning: dict, specs: dict, schemes: dict, prompts, do_cfg: bool, keep):
        context = multiprocessing.get_context(START_METHOD)
        self.names = list(schemes)
        self._staging = Path(staging)
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_quantize_ahead,
            args=(send, str(staging), conditioning, specs, schemes, list(prompts), do_cfg, keep),
            name="edgediff-text-ahead",
            daemon=True,  # never outlives the export
        )
        self._process.start()
        send.close()  # the child's end: a child that dies leaves the pipe at EOF
        self._records: dict | None = None

    def records(self) -> dict[str, dict]:
        """Each text encoder's quantisation record, once the process has quantised them all (waits for it); {} where
        it ended without them (killed), its work removed: they are then quantised with the other graphs. An error
        in the quantisation itself is raised here, as it would have been there."""
        if self._records is None:
            try:
                outcome, value = self._receive.recv()
            except EOFError:
                outcome, value = "died", None
            self._process.join()
            if outcome == "error":
                raise value
            if outcome == "died":
                log.warning(
                    "the text encoders' quantisation process ended with code %s: quantising them after the recording",
                    self._process.exitcode,
                )
                for name in self.names:
                    shutil.rmtree(self._staging / f".quantized-{name}", ignore_errors=True)
                value = {}
            self._records = value
        return self._records

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._receive.close()

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
) -> TextAhead | None:
    """A TextAhead for the text encoders the policy quantises, once every encoder of the UNet's text
    `conditioning` is `written` (name -> ComponentSpec) and the UNet is among `exports_left` (name -> Weights, the
    components not exported yet); None where that is not so, or where the memory plan says the two would not fit
    (memory_plan.quantise_ahead)."""
    from .quantize import SCHEMES

    encoders = [e["component"] for e in conditioning.get("encoders", [])]
    if "unet" not in exports_left or not encoders or any(e not in written for e in encoders):
        return None
    names = [e for e in encoders if policy.get(e)]
    if not names:
        return None
    graphs = {n: (written[n].size, policy[n], graph_largest(staging / written[n].graph_file)) for n in names}
    if not quantise_ahead(graphs, list(exports_left.values()), available_bytes()):
        log.info("the text encoders are quantised after the recording: beside the UNet's export they may not fit")
        return None
    log.info("quantising %s while the remaining graphs are exported", ", ".join(names))
    specs = {e: written[e] for e in encoders}
    return TextAhead(staging, conditioning, specs, {n: SCHEMES[policy[n]] for n in names}, prompts, do_cfg, keep)


def _quantize_ahead(send, staging: str, conditioning: dict, specs: dict, schemes: dict, prompts, do_cfg, keep) -> None:
    """The process's work: the encoders' feeds recorded, each quantised in turn; sends ("done", records) or
    ("error", exception). Its stages go to the export's stages log (progress.STAGES_LOG_ENV, inherited)."""
    try:
        from .bundle_quantize import quantize_one
        from .calibration import record_text_feeds
        from .progress import Stages

        stages = Stages(enabled=False)
        with stages.stage("text encoders: recording calibration inputs"):
            feeds = record_text_feeds(Path(staging), conditioning, specs, list(schemes), prompts, do_cfg)
        records = {
            name: quantize_one(Path(staging), specs[name].graph_file, name, scheme, feeds.pop(name), keep, stages)
            for name, scheme in schemes.items()
        }
    except BaseException as exc:  # Ctrl-C reaches the export too: what it gets back does not matter then
        send.send(("error", _sendable(exc)))
        return
    send.send(("done", records))


def _sendable(exc: BaseException) -> BaseException:
    """`exc` where it survives pickling between processes (edgediff's errors do), else a RuntimeError with its
    traceback."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # any exception pickle raises: the error is then told in words
        return RuntimeError("".join(traceback.format_exception(exc)))
