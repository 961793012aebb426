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
