"""Settings both targets share while PyTorch traces or exports the source's modules."""

from __future__ import annotations

from contextlib import contextmanager


def quiet_tracing() -> None:
    """Silences the tracer's notes about Python control flow in diffusers' modules: they say nothing to
    our users, since every graph is checked against PyTorch after export."""
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def trace_context(reduced):
    """The size a graph with dynamic height and width is traced at: the check's reduced grid
    (specs.check_context) plus 8 latent cells, kept a multiple of 8 cells so that every downsampling stays
    whole. Tracing at the bundle's size cost more than the rest of the fp32 export for the VAE (optimum
    traces its encoder at the config's sample_size, 768 px, batch 2); any other size gives the same graph,
    and a trace size other than the check's lets the check prove that height and width stay dynamic."""
    import dataclasses

    from .specs import CHECK_CELL_MULTIPLE

    scale = reduced.vae_scale_factor

    def side(pixels: int) -> int:
        cells = -(-(pixels // scale) // CHECK_CELL_MULTIPLE) * CHECK_CELL_MULTIPLE
        return (cells + CHECK_CELL_MULTIPLE) * scale

    return dataclasses.replace(reduced, height=side(reduced.height), width=side(reduced.width))


def trace_on_inputs(export_config, inputs: dict) -> None:
    """Makes optimum trace `export_config`'s graph on `inputs` (name -> numpy array, e.g. the component's
    random inputs at trace_context) for its inputs with dynamic height and width, instead of its own dummy
    inputs sized from the model's config. Other inputs keep optimum's dummies."""
    import torch

    original = export_config.generate_dummy_inputs
    spatial = {name for name, axes in export_config.inputs.items() if {2, 3} <= set(axes) and name in inputs}

    def generate(framework: str = "pt", **shapes):
        dummies = original(framework=framework, **shapes)
        for name in spatial & set(dummies):
            dummies[name] = torch.from_numpy(inputs[name]) if framework == "pt" else inputs[name]
        return dummies

    export_config.generate_dummy_inputs = generate  # an instance attribute over the class's method


@contextmanager
def released_after_export(release):
    """Runs `release()` (freeing the module's weights) as soon as PyTorch has written a graph inside optimum's
    export_models, before optimum gathers a large graph's external data into one file: that step loads every
    weight of the graph, and with the module still alive the stage would hold its weights twice (the fp32
    export's peak: the UNet's stage of full-size SD-Turbo). Scoped: torch.onnx.export is restored on exit.
    Hand-written because optimum offers no hook between its two steps."""
    import torch

    original = torch.onnx.export

    def export_then_release(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            release()

    torch.onnx.export = export_then_release
    try:
        yield
    finally:
        torch.onnx.export = original
