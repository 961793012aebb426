"""What recording calibration inputs runs: the bundle's own call for calibrated (static int8) schemes, whose
activation ranges depend on it; a bounded one for the rest (dynamic int8, 4-bit), which only check against it."""

import pytest

from edgediff.export.calibration import UNCALIBRATED_MAX_PIXELS, UNCALIBRATED_MAX_STEPS, bounded_call


def test_a_large_default_call_is_scaled_to_the_pixel_bound_keeping_aspect_and_multiples():
    call = bounded_call({"steps": 40, "height": 1024, "width": 1024}, multiple=16)
    assert call == {"num_inference_steps": UNCALIBRATED_MAX_STEPS, "height": 512, "width": 512}
    wide = bounded_call({"steps": 28, "height": 768, "width": 1344}, multiple=32)
    assert wide["height"] % 32 == 0 and wide["width"] % 32 == 0
    assert wide["height"] * wide["width"] <= UNCALIBRATED_MAX_PIXELS
    assert wide["width"] / wide["height"] == pytest.approx(1344 / 768, rel=0.1)


def test_a_small_default_call_is_left_as_it_is():
    assert bounded_call({"steps": 1, "height": 512, "width": 512}, multiple=8) == {"num_inference_steps": 1}


@pytest.mark.parametrize(("precision", "bounded"), [("int8", True), ("int4", True), ("int8-static", False)])
def test_only_uncalibrated_precisions_record_a_bounded_call(models_root, tmp_path, monkeypatch, precision, bounded):
    pytest.importorskip("torch")
    from tiny_models import tiny_source

    import edgediff.export.calibration as calibration
    from edgediff.export import export_bundle

    seen = []
    real = calibration.record_feeds

    def spy(*args, **kwargs):
        seen.append(kwargs.get("bounded", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "record_feeds", spy)
    export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "b", precision=precision, progress=False)
    assert seen == [bounded]


def test_recording_halves_each_side_while_every_latent_side_keeps_its_floor():
    from edgediff.export.calibration import recording_call
    from edgediff.export.quantize import MIN_REDUCED_CELLS, REDUCED_CELL_MULTIPLE

    sd = {"steps": 1, "height": 512, "width": 512}
    assert recording_call(sd, multiple=8, vae_scale=8, bounded=False) == {"height": 256, "width": 256}
    wide = recording_call({"steps": 4, "height": 768, "width": 1344}, multiple=16, vae_scale=8, bounded=False)
    assert wide == {"height": 384, "width": 640}  # whole cells at a UNet's bottom level: sides of 64 px
    # 832 halved is 416 px, 52 latent cells: a UNet's three downsamplings leave 6.5; 384 px leaves 6
    tall = recording_call({"steps": 1, "height": 832, "width": 512}, multiple=8, vae_scale=8, bounded=False)
    assert tall == {"height": 384, "width": 256}
    for call in (wide, tall, recording_call({"height": 1024, "width": 768}, multiple=8, vae_scale=8, bounded=True)):
        assert all(call[side] // 8 % REDUCED_CELL_MULTIPLE == 0 for side in ("height", "width")), call
    # SD3.5 at 1024, bounded to 512 for an uncalibrated scheme, then halved: 32 latent cells a side
    sd35 = recording_call({"steps": 40, "height": 1024, "width": 1024}, multiple=16, vae_scale=8, bounded=True)
    assert sd35 == {"num_inference_steps": UNCALIBRATED_MAX_STEPS, "height": 256, "width": 256}
    assert 256 // 8 == MIN_REDUCED_CELLS
    # a side that would fall under the floor: the size stays (DC-AE's 32x at 1024 is 32 cells; the shipped model's 8)
    assert recording_call({"height": 1024, "width": 1024}, multiple=32, vae_scale=32, bounded=False) == {}
    assert recording_call({"height": 64, "width": 64}, multiple=8, vae_scale=8, bounded=False) == {}
    assert recording_call({"height": 384, "width": 512}, multiple=8, vae_scale=8, bounded=False) == {}
