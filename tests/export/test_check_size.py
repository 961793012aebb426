"""The export check's size: graphs with dynamic height and width are checked on a smaller latent grid,
recorded in the manifest; the progress bar names the stages."""

import pytest
from tiny_models import tiny_bundle, tiny_source

from edgediff.runtime import Bundle

pytest.importorskip("torch")


@pytest.mark.parametrize(
    "cells,checked",
    [(64, 16), (128, 32), (96, 24), (80, 16), (40, 8), (32, 8), (8, 8), (6, 6)],
)
def test_check_side_is_a_quarter_in_multiples_of_8_never_below_8_nor_above_the_bundle(cells, checked):
    from edgediff.export.specs import check_side

    assert check_side(cells) == checked


def test_check_context_keeps_full_size_without_spatial_axes():
    from edgediff.export.specs import ExportContext, check_context

    ctx = ExportContext(512, 768, 4, 4, 8, 0.18215, 77, 1000, 768, None)
    assert check_context(ctx, spatial=False) is ctx
    small = check_context(ctx, spatial=True)
    assert (small.height, small.width) == (128, 192) and small.latent_channels == ctx.latent_channels


def test_graphs_are_traced_past_the_check_size_in_whole_multiples_of_8_cells():
    from edgediff.export.specs import ExportContext, check_context
    from edgediff.export.tracing import trace_context

    for height, width, traced in ((512, 768, (192, 256)), (64, 32, (128, 128)), (1024, 1024, (320, 320))):
        checked = check_context(ExportContext(height, width, 4, 4, 8, 0.18215, 77, 1000, 768, None), spatial=True)
        ctx = trace_context(checked)
        assert (ctx.height, ctx.width) == traced
        assert ctx.height != checked.height and ctx.width != checked.width  # the check runs at another size
        assert ctx.height % 64 == 0 and ctx.width % 64 == 0  # 8 cells of 8 pixels


def test_tracing_takes_our_inputs_for_the_dynamic_size_ones_only():
    import numpy as np
    import torch

    from edgediff.export.tracing import trace_on_inputs

    class Config:  # the part of optimum's OnnxConfig that trace_on_inputs uses
        inputs = {"sample": {0: "batch_size", 2: "height", 3: "width"}, "timestep": {0: "steps"}}

        def generate_dummy_inputs(self, framework="pt", **shapes):
            return {"sample": torch.zeros(2, 4, 96, 96), "timestep": torch.ones(1)}

    config = Config()
    ours = {"sample": np.ones((2, 4, 24, 24), np.float32), "timestep": np.zeros(1, np.float32)}
    trace_on_inputs(config, ours)
    traced = config.generate_dummy_inputs(framework="pt")
    assert tuple(traced["sample"].shape) == (2, 4, 24, 24) and float(traced["sample"].mean()) == 1.0
    assert float(traced["timestep"][0]) == 1.0  # not a spatial input: optimum's own
    assert isinstance(config.generate_dummy_inputs(framework="np")["sample"], np.ndarray)


def test_the_manifest_says_what_size_each_graph_was_checked_at(models_root):
    from edgediff.export.specs import check_side

    m = Bundle.open(tiny_bundle("tiny-sd1", models_root)).manifest
    sizes = m.provenance["export_check"]["size"]
    scale = m.vae_scale_factor
    side = check_side(m.defaults["height"] // scale)
    assert side < m.defaults["height"] // scale  # the tiny bundle's grid is reduced too
    for name in ("unet", "vae_decoder", "vae_encoder"):
        assert sizes[name] == {"height": side * scale, "width": side * scale, "full_size": False}
    assert sizes["text_encoder"] == {"full_size": True}
    assert set(sizes) == set(m.components)


def test_fp16_graphs_that_may_overflow_are_checked_at_full_size(models_root):
    m = Bundle.open(tiny_bundle("tiny-sd1", models_root, precision="fp16")).manifest
    sizes = m.provenance["export_check"]["size"]
    full = {"height": m.defaults["height"], "width": m.defaults["width"], "full_size": True}
    assert sizes["vae_decoder"] == sizes["vae_encoder"] == full
    assert sizes["unet"]["full_size"] is False


def test_the_progress_bar_names_each_stage(models_root, tmp_path, capsys):
    from edgediff.export import export_bundle

    export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "b", precision="int8", progress=True)
    err = capsys.readouterr().err
    for stage in ("unet: export", "unet: check", "recording calibration inputs", "unet: quantize", "done"):
        assert stage in err, stage
