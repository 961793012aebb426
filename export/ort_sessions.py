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


def measuring_options(quiet: bool = False):
    """SessionOptions for an exporter's fp32 measurement (see the module's docstring). `quiet`: onnxruntime's
    warnings off (the sensitivity pass overrides initializers on purpose)."""
    import onnxruntime as ort

    from edgediff.runtime.session_config import skip_layout_changes

    options = skip_layout_changes(ort.SessionOptions())
    no_spinning(options)
    if quiet:
        options.log_severity_level = 3
    return options


def measuring_session(path: Path, providers=("CPUExecutionProvider",), options=None):
    """A session of the graph at `path` for an exporter's fp32 measurement (`options`: measuring_options()'s)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), options or measuring_options(), providers=list(providers))


def no_spinning(options):
    """`options` with onnxruntime's threads sleeping between runs rather than spinning: graphs are quantised side by
    side (bundle_writer._quantize_bundle), and a session's spinning threads would take the cores the other needs."""
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
