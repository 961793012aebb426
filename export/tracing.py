"""Settings both targets share while PyTorch traces or exports the source's modules."""

from __future__ import annotations


def quiet_tracing() -> None:
    """Silences the tracer's notes about Python control flow in diffusers' modules: they say nothing to
    our users, since every graph is checked against PyTorch after export."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
