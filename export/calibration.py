"""Calibration inputs for quantization: real prompts through the real text encoder and sampler.

The fp32 bundle (already checked against PyTorch) generates from each prompt while every graph's
inputs are recorded, so each component is calibrated on what it sees at run time: UNet inputs at
every step of the bundle's own sampler, each decoder's (full VAE, tiny) inputs from finished latents,
at a reduced size where the images allow it (recording_call).
Each graph's first output is kept beside its inputs: the fp32 reference the quantised graph is checked
against, so that the fp32 graph need not run over the feeds a second time.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .quantize import MAX_CALIBRATION_FEEDS, MIN_REDUCED_CELLS, REDUCED_CELL_MULTIPLE

# Generic prompts for models of the photo/art world; the shipped model passes its own domain's captions.
CALIBRATION_PROMPTS = (
    "a photo of a cat sitting on a windowsill",
    "a mountain lake at sunrise, mist over the water",
    "portrait of an old fisherman, dramatic light",
    "a bowl of fruit on a wooden table, still life",
    "a futuristic city street at night, neon signs",
    "a watercolor painting of a red fox in the snow",
    "an astronaut riding a horse on the moon",
    "a cozy living room with a fireplace, interior design",
)


# Schemes without activation ranges (dynamic int8, 4-bit weights) use the recorded feeds only to check the quantised
# graph (and to rank blocks for --keep auto): a transformer's default call (SD3.5: 40 guided steps at 1024, its
# attention scores alone 7.5 GB) would cost an hour and more memory than the graphs. They are recorded at most at
# this many pixels, steps and prompts; calibrated (static) schemes record the bundle's own call (at
# recording_call's size) on every calibration prompt, whose ranges they take.
UNCALIBRATED_MAX_PIXELS = 512 * 512
UNCALIBRATED_MAX_STEPS = 2
UNCALIBRATED_MAX_PROMPTS = 2


# Every recording runs its images at a reduced size where they allow it: each side divided by this (a multiple of
# the bundle's size multiple), as long as every latent side keeps quantize.MIN_REDUCED_CELLS cells. Recording is most
# of what the fastest export adds to the graphs' own export, and its cost falls with the pixels: the full-size
# SD-Turbo UNet's calibration runs took 15 s at 256 against 46 s at 512 (2 AVX2 cores), and its int8-static output
# error at 512 was no worse for it (0.0556 against 0.0575 relative RMS on held-out prompts, random weights). The
# graphs' axes are dynamic: the quantised graph is the same at either size, and is checked at the size recorded
# (the manifest's `checked_on`).
RECORDING_SIDE_FRACTION = 2
# Recordings whose images have at most this many pixels generate their prompts side by side, one per core (each graph
# on the cores left per prompt, one where there are no more cores than prompts): at such sizes a graph's operators are
# too small to keep two threads busy (the full-size SD-Turbo UNet's eight range-taking runs at 256x256, 32x32 latents:
# 8.8-9.4 s side by side on one thread each against 10.3-10.7 s one after another on both cores). Each call holds
# activations of its own, which grow with the pixels: small images only.
SIDE_BY_SIDE_PIXELS = 256 * 256


def recording_call(defaults: dict, multiple: int, vae_scale: int, bounded: bool) -> dict:
    """The call arguments recording runs with: bounded_call's where `bounded` (schemes without activation ranges),
    else the bundle's own call; either with its sides divided by RECORDING_SIDE_FRACTION where every latent side
    (pixels / `vae_scale`) keeps MIN_REDUCED_CELLS cells. A side it sets is a multiple of `multiple` (the bundle's
    size multiple) and of REDUCED_CELL_MULTIPLE latent cells: a UNet's traced upsamplings double each side, so its
    latent sides must halve evenly at every level (832 px halved is 52 cells, which the third downsampling leaves at
    7 and its upsampling brings back to 14, against the skip connection's 13)."""
    step = math.lcm(multiple, vae_scale * REDUCED_CELL_MULTIPLE)
    call = bounded_call(defaults, step) if bounded else {}
    height, width = call.get("height", defaults.get("height")), call.get("width", defaults.get("width"))
    if height and width:
        cut = [side // RECORDING_SIDE_FRACTION // step * step for side in (height, width)]
        if min(cut) // vae_scale >= MIN_REDUCED_CELLS:
            call["height"], call["width"] = cut
    return call


def bounded_call(defaults: dict, multiple: int) -> dict:
    """The call arguments recording runs with for uncalibrated schemes: the bundle's default size scaled down (aspect
    kept, each side a multiple of `multiple`) to at most UNCALIBRATED_MAX_PIXELS, and its default steps capped
    (record_feeds also takes only the first UNCALIBRATED_MAX_PROMPTS prompts)."""
    height, width = defaults.get("height"), defaults.get("width")
    call = {"num_inference_steps": min(int(defaults.get("steps") or 1), UNCALIBRATED_MAX_STEPS)}
    if height and width and height * width > UNCALIBRATED_MAX_PIXELS:
        scale = math.sqrt(UNCALIBRATED_MAX_PIXELS / (height * width))
        call["height"] = max(multiple, int(height * scale) // multiple * multiple)
        call["width"] = max(multiple, int(width * scale) // multiple * multiple)
    return call


class RecordedFeeds(list):
    """A graph's recorded input dicts, with `outputs`: its first output for each, in the same order, `ranges`:
    its activation ranges over them where recording took them (record_feeds' `ranges_for`), else None, and
    `seconds`: what each recorded run took (every run, kept or not; what the export's later runs of the graph
    will cost, for the progress bar)."""

    def __init__(self, feeds=(), outputs=(), ranges=None, seconds=()):
        super().__init__(feeds)
        self.outputs = list(outputs)
        self.ranges = ranges
        self.seconds = list(seconds)
        self.order = [0] * len(self)  # each feed's ranges.RUN_ORDER: the prompt it was recorded for

    def in_order(self) -> list[int]:
        """The feeds' indices in recording order: by prompt, those of one prompt as they ran (appended side by side,
        prompts interleave)."""
        return sorted(range(len(self)), key=self.order.__getitem__)

    def seconds_per_run(self) -> float | None:
        return float(np.median(self.seconds)) if self.seconds else None


def record_feeds(
    bundle_dir: Path,
    prompts=CALIBRATION_PROMPTS,
    components: list[str] | None = None,
    seed: int = 0,
    one_at_a_time: bool = False,
    bounded: bool = False,
    ranges_for: dict | None = None,
    replayed: dict | None = None,
) -> dict[str, RecordedFeeds]:
    """Per component (default: all that a text-to-image call runs), up to MAX_CALIBRATION_FEEDS input
    dicts recorded while generating `prompts`, with the graph's output for each. `one_at_a_time`: the bundle runs
    in low-memory mode, each graph opened when needed and closed before the next (memory_plan.
    record_one_at_a_time: for bundles whose graphs do not fit in memory together; slower, as each prompt reopens
    them). `bounded`: the call is bounded_call's (for schemes without activation ranges). `ranges_for`: components
    (name -> quantize.Scheme) whose activation ranges over the kept feeds are taken while recording, in
    RecordedFeeds.ranges: each runs as a ranges.RangeSession in place of its own session, so that its feeds need
    not run again to calibrate it (the full-size SD-Turbo UNet at 512: 8 runs, 39 s). `replayed`: text encoders
    (name -> TextRuns) whose runs on these prompts were made ahead, given back instead of run (ReplayedSession)."""
    from edgediff.runtime import Bundle, Pipeline
    from edgediff.runtime.denoisers import size_multiple
    from edgediff.runtime.pipeline import text_to_image_components

    from .ort_sessions import share_cores
    from .ranges import RangeGraph

    bundle = Bundle.open(bundle_dir, verify="none")
    m = bundle.manifest
    names = text_to_image_components(m) if components is None else list(components)
    unknown = set(ranges_for or {}) - set(names)
    if unknown:
        raise ValueError(f"ranges wanted for components not recorded: {', '.join(sorted(unknown))}")
    call = recording_call(m.defaults, size_multiple(m), m.vae_scale_factor, bounded)
    prompts = recorded_prompts(prompts, bounded)
    workers, threads = share_cores(1 if one_at_a_time else side_by_side(call, m.defaults, len(prompts)))
    range_graphs = {}
    try:
        for name, scheme in (ranges_for or {}).items():
            range_graphs[name] = RangeGraph(bundle.file(m.components[name].graph_file), scheme)
        # without the CPU layout rewrite: a few calls of each graph do not repay its cost to open them (13-19 s
        # against 2-3 s for the full-size fp32 SD-Turbo pipeline on 2 cores)
        pipe = Pipeline(
            bundle,
            provider="cpu",
            cache=False,
            low_memory=one_at_a_time,
            cpu_layout=False,
            threads=threads,
            graph_openers={
                **{name: functools.partial(ReplayedSession, name, runs) for name, runs in (replayed or {}).items()},
                **{
                    name: functools.partial(g.open, name, low_memory=one_at_a_time, threads=threads)
                    for name, g in range_graphs.items()
                },
            },
        )
        return _record(pipe, prompts, names, seed, one_at_a_time, call, workers, range_graphs)
    finally:
        for graph in range_graphs.values():
            graph.remove()


def side_by_side(call: dict, defaults: dict, prompts: int) -> int:
    """How many prompts a recording generates at once: one per core where its images have at most
    SIDE_BY_SIDE_PIXELS (`call`'s size, else the bundle's default), else one."""
    from .ort_sessions import share_cores

    height, width = call.get("height", defaults.get("height")), call.get("width", defaults.get("width"))
    if not height or not width or height * width > SIDE_BY_SIDE_PIXELS:
        return 1
    return share_cores(prompts)[0]


def _record(pipe, prompts, names, seed, one_at_a_time, call, workers, range_graphs) -> dict[str, RecordedFeeds]:
    from edgediff.runtime.pipeline import DECODERS

    from .ranges import RUN_ORDER

    # decoders whose inputs are wanted (full VAE, tiny decoder): each decodes the same sampled latents
    decoders = [d for d, component in DECODERS.items() if component in names]
    watched = (
        recording_opened(pipe.sessions, names)
        if one_at_a_time
        else recording({name: pipe.sessions.get(name) for name in names}, at_once=workers)
    )

    def generate(i: int) -> None:
        order = RUN_ORDER.set(i)  # in this thread: its runs are kept in prompt order
        try:
            latents = pipe(prompts[i], seed=seed + i, output_type="latent", **call).images
            for decoder in decoders:  # a decode (seconds at 512) runs only when its inputs are wanted
                pipe.decode(latents, decoder=decoder, output_type="np")
        finally:
            RUN_ORDER.reset(order)

    try:
        with watched as recorded:
            if workers == 1:
                for i in range(len(prompts)):
                    generate(i)
            else:
                pool = ThreadPoolExecutor(workers, thread_name_prefix="edgediff-record")
                try:
                    for _ in pool.map(generate, range(len(prompts))):  # raises a prompt's error
                        pass
                finally:
                    pool.shutdown(cancel_futures=True)  # after an error: no prompt started past it
    finally:
        pipe.close()
    return {name: _kept(name, feeds, range_graphs.get(name)) for name, feeds in recorded.items()}


def recorded_prompts(prompts, bounded: bool) -> list[str]:
    """The prompts a recording generates from: all, or the first UNCALIBRATED_MAX_PROMPTS where `bounded`."""
    return list(prompts)[:UNCALIBRATED_MAX_PROMPTS] if bounded else list(prompts)


def _kept(name: str, feeds: RecordedFeeds, graph=None) -> RecordedFeeds:
    """At most MAX_CALIBRATION_FEEDS of a graph's recorded feeds, spread over the recording, with their outputs
    (and their activation ranges where its RangeGraph `graph` took them), in recording order."""
    stride = max(1, len(feeds) // MAX_CALIBRATION_FEEDS)
    kept = list(range(len(feeds)))[::stride][:MAX_CALIBRATION_FEEDS]  # places in recording order
    if graph is not None and len(graph.runs) != len(feeds):  # each run's ranges belong to the feed it recorded
        raise RuntimeError(f"{name}: {len(graph.runs)} runs of its calibration graph for {len(feeds)} feeds")
    ordered = feeds.in_order()  # graph.runs is in the same order
    return RecordedFeeds(
        [feeds[ordered[i]] for i in kept],
        [feeds.outputs[ordered[i]] for i in kept],
        graph.ranges(kept) if graph else None,
        feeds.seconds,
    )


def record_text_feeds(
    staging: Path,
    conditioning: dict,
    specs: dict,
    names: list[str],
    prompts,
    do_cfg: bool,
) -> tuple[dict[str, RecordedFeeds], dict]:
    """record_feeds for text encoders alone, in a bundle still being written (text_ahead.py): the feeds the runtime's
    text conditioner (runtime/conditioning.TextConditioner: the UNet families') gives each encoder of `names` while it
    encodes `prompts` one at a time, and the empty negative after each under classifier-free guidance (`do_cfg`), as
    record_feeds' pipeline calls do. `conditioning`: the manifest's entry (manifest_builder.write_text_conditioning,
    its tokenizer files written); `specs`: the ComponentSpec of each encoder of `names`, its fp32 graph written and
    checked. Only those encoders run: each one's feeds are its own tokens, whatever the others make. Also returns each
    one's TextRuns, for the recording of the other graphs' feeds."""
    from types import SimpleNamespace

    from edgediff.runtime.conditioning import TextConditioner
    from edgediff.runtime.manifest import TOKENIZER_NAME
    from edgediff.runtime.session import GraphSession

    class StagedText:  # what the conditioner reads of a bundle: the manifest is written after the other graphs
        manifest = SimpleNamespace(conditioning=conditioning, text_encoders=conditioning["encoders"])

        @staticmethod
        def tokenizer_file(entry: dict) -> Path:
            return Path(staging) / entry.get("file", TOKENIZER_NAME)

    # as record_feeds' pipeline opens them: on the CPU, without the layout rewrite
    sessions = {
        name: GraphSession(name, Path(staging) / specs[name].graph_file, specs[name], None, staging, cpu_layout=False)
        for name in names
    }
    conditioner = TextConditioner(StagedText(), sessions)
    conditioner.encoders = [e for e in conditioner.encoders if e.component in sessions]
    runs = {
        e.component: TextRuns(sessions[e.component].output_names, {e.output, e.pooled}) for e in conditioner.encoders
    }
    with recording(sessions) as recorded:
        for name, session in sessions.items():
            session.run = runs[name].capture(session.run)  # the recording's own wrapper goes with it afterwards
        for prompt in prompts:
            conditioner([prompt], None, do_cfg, 1, 0, 0, {})
    del conditioner, sessions
    return {name: _kept(name, feeds) for name, feeds in recorded.items()}, runs


class TextRuns:
    """A text encoder's runs by the tokens they took, with the outputs the text conditioner reads of each (`wanted`:
    its `output` and `pooled`): recorded where its quantisation runs ahead (text_ahead.py), so that the recording of
    the other graphs' feeds, which runs the same prompts, takes them from here instead of opening and running the
    fp32 graph again (ReplayedSession; full-size SD-Turbo's text encoder: 1.3 s to open, 1.5 s for eight prompts)."""

    def __init__(self, output_names, wanted):
        self.output_names = list(output_names)
        self.wanted = {n for n in wanted if n}
        self.runs: dict[tuple, dict[str, np.ndarray]] = {}

    @staticmethod
    def key(feeds: dict) -> tuple:
        """A run's tokens, whatever integer type they came in."""
        return tuple(sorted((k, np.shape(v), np.asarray(v).astype(np.int64).tobytes()) for k, v in feeds.items()))

    def capture(self, run):
        def captured(run_options=None, **feeds):
            outputs = run(run_options, **feeds)
            kept = {n: np.array(v) for n, v in zip(self.output_names, outputs) if n in self.wanted}
            self.runs[self.key(feeds)] = kept
            return outputs

        return captured


class ReplayedSession:
    """A text encoder's session in a recording pipeline (record_feeds' `replayed`) that gives back the outputs of
    its runs in TextRuns; a run on other tokens is an error: the recording's prompts are the ones run ahead."""

    def __init__(self, name: str, runs: TextRuns):
        self.name, self._runs = name, runs
        self.output_names = runs.output_names

    def run(self, run_options=None, **feeds) -> list:
        outputs = self._runs.runs.get(TextRuns.key(feeds))
        if outputs is None:
            raise RuntimeError(f"{self.name}: run on tokens its quantisation process did not run")
        return [outputs.get(n) for n in self.output_names]


@contextmanager
def recording(sessions: dict, at_once: int = 1):
    """Records every run of these graph sessions (name -> GraphSession) while the block runs, and yields
    name -> the feeds of each run, as the graph checked them (the dtypes it declares), with its first output.
    Each session's own `run` is back in place afterwards: recording is the exporter's business, not the
    runtime's. `at_once`: the runs going on side by side (each run's seconds are its share of the cores)."""
    recorded: dict[str, RecordedFeeds] = {name: RecordedFeeds() for name in sessions}
    own = {name: vars(session).get("run") for name, session in sessions.items()}  # a run already set on the object
    for name, session in sessions.items():
        # an instance attribute over the class's method
        session.run = _recording_run(session, recorded[name], at_once)
    try:
        yield recorded
    finally:
        for name, session in sessions.items():
            if own[name] is None:
                del session.run
            else:
                session.run = own[name]


@contextmanager
def recording_opened(pool, names: list[str]):
    """recording() for a low-memory SessionPool, whose sessions open and close in turn: every session of `names`
    the pool opens while the block runs records its runs."""
    recorded: dict[str, RecordedFeeds] = {name: RecordedFeeds() for name in names}

    def open_recording(name: str):
        session = previous(name)
        if name in recorded:
            session.run = _recording_run(session, recorded[name])
        return session

    previous = pool.set_opener(open_recording)
    try:
        yield recorded
    finally:
        pool.set_opener(previous)


_APPENDING = threading.Lock()  # a run's feed, output, seconds and order are appended together


def _recording_run(session, into: RecordedFeeds, at_once: int = 1):
    from .ranges import RUN_ORDER

    real = session.run

    def run(run_options=None, **feeds):
        checked = session.check_inputs(feeds)
        start = time.perf_counter()
        outputs = real(run_options, **checked)
        seconds = (time.perf_counter() - start) / at_once
        feed = {name: np.array(value) for name, value in checked.items()}
        with _APPENDING:
            into.seconds.append(seconds)
            into.append(feed)
            into.outputs.append(np.array(outputs[0]))
            into.order.append(RUN_ORDER.get())
        return outputs

    return run
