"""The onnxruntime sessions the exporter opens to measure fp32 graphs: checks against PyTorch, block
recordings and whole-graph runs of the sensitivity pass, activation-range calibration.

They open at onnxruntime's extended level: every graph fusion the runtime makes, not the CPU layout rewrite
(blocked NCHWc convolutions with reordered copies of their weights). That rewrite took 22 of the 24 s it took
to open the full-size SD-Turbo UNet on 2 cores (2.1 s without it), for calls 3% faster: worth it for a runtime
that keeps its sessions, not for a measurement that runs a graph a few times. Its kernels compute the same
sums in another order (float rounding apart, the same values). Quantised graphs are checked as the runtime
opens them (quantize.py): their int8 kernels are what the check measures.
"""

from __future__ import annotations

from pathlib import Path


def runtime_options(quiet: bool = False):
    """SessionOptions as the runtime opens a graph (session_config.session_options: every optimisation, one thread
    per core, idle threads asleep rather than spinning, which graphs quantised side by side need: a session's
    spinning threads would take the cores the other uses). `quiet`: onnxruntime's warnings off, as the runtime has
    them; on otherwise."""
    from edgediff.runtime.session_config import session_options

    options = session_options()
    if not quiet:
        options.log_severity_level = 2  # onnxruntime's default: warnings
    return options


def measuring_options(quiet: bool = False, once: bool = False):
    """SessionOptions for an exporter's fp32 measurement (see the module's docstring). `quiet`: onnxruntime's
    warnings off (the sensitivity pass overrides initializers on purpose). `once`: for a graph run once, no
    prepacking: onnxruntime copies every matrix into its kernels' layout as a session opens, so that each run is
    faster, which a single run does not pay back. Full-size SD-Turbo on 2 cores, each in a process of its own: its
    fp32 UNet opened in 0.2 s instead of 1.5 s and ran once (32x32 latents) 0.1-0.2 s slower; its text encoder
    opened in 0.1 s instead of 1.3-1.4 s and ran 0.2 s slower. The peak is the same either way (3.47 GiB for the
    UNet: weights are memory-mapped, and the packed copies take the place of the pages they were packed from); the
    sums are the same in another order (float rounding apart). Not for int8 graphs: their kernels without packed
    weights ran 3.6x slower and rounded differently (quantised graphs are measured as the runtime opens them)."""
    from edgediff.runtime.session_config import skip_layout_changes

    options = skip_layout_changes(runtime_options(quiet))
    if once:
        options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def share_cores(jobs: int) -> tuple[int, int | None]:
    """How `jobs` runs that may overlap share the cores: (runs at once, onnxruntime threads for each). At the small
    sizes the exporter records and checks at, a graph's operators are too small to keep two threads busy, so runs go
    one per core at once, each on the cores left per run (one where there are no more cores than runs); (1, None),
    one run at a time on every core, for a single run or core."""
    from edgediff.runtime.session_config import physical_cores

    cores = physical_cores()
    workers = max(1, min(cores, jobs))
    return (workers, cores // workers) if workers > 1 else (1, None)


def measuring_session(path: Path, providers=("CPUExecutionProvider",), options=None):
    """A session of the graph at `path` for an exporter's fp32 measurement (`options`: measuring_options()'s)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options or measuring_options(), providers=list(providers))
