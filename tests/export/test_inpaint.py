"""Inpainting (ordinary and 9-channel inpainting UNets) against diffusers' StableDiffusionInpaintPipeline
on the same image, mask and noise; outpainting; and on the shipped model, a repainted shape."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import (
    PIXEL_ATOL,  # noqa: E402
    reference_pipeline,  # noqa: E402
)
from references import gradient_image as _image  # noqa: E402
from replay_noise import ReplayNoise  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import InputError, Pipeline  # noqa: E402
from edgediff.runtime.inpaint import outpaint_canvas  # noqa: E402

CASES = [
    ("tiny-sd1", "euler", 4, 1.0),
    ("tiny-sd1", "ddim", 4, 0.7),
    ("tiny-sd1-inpaint", "euler", 3, 1.0),
    ("tiny-sd1-inpaint", "ddim", 4, 0.75),
    ("tiny-sdxl", "euler", 4, 1.0),
    ("tiny-sdxl", "euler", 4, 0.7),
    ("tiny-sdxl-inpaint", "euler", 3, 1.0),
    ("tiny-sdxl-inpaint", "euler", 4, 0.75),
]


def _mask(size: int) -> Image.Image:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : size // 2] = 255  # repaint a block, keep the rest
    return Image.fromarray(mask)


def _reference(monkeypatch, source, sampler, manifest, image, mask, steps, strength, noises):
    pipe = reference_pipeline("inpaint", source, manifest, sampler, noises, monkeypatch)
    size = manifest.defaults["height"]
    return pipe(
        "a red circle",
        image=Image.fromarray((image * 255).round().astype(np.uint8)),
        mask_image=mask,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        height=size,
        width=size,
        output_type="np",
    ).images


@pytest.mark.parametrize("arch,sampler,steps,strength", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_inpaint_matches_diffusers(models_root, monkeypatch, arch, sampler, steps, strength):
    pipe = Pipeline.from_bundle(tiny_bundle(arch, models_root), provider="cpu", sampler=sampler)
    m = pipe.manifest
    size = m.defaults["height"]
    image = (np.round(_image(size) * 255) / 255).astype(np.float32)  # the 8-bit image both sides see
    lat = (1, m.latent_channels, size // m.vae_scale_factor, size // m.vae_scale_factor)
    rng = np.random.default_rng(3)
    noises = [rng.standard_normal(lat).astype(np.float32) for _ in range(3)]
    mask = _mask(size)
    ours = pipe(
        "a red circle",
        image=image,
        mask_image=mask,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="np",
        generator=ReplayNoise(noises),
    ).images
    theirs = _reference(monkeypatch, tiny_source(arch, models_root), sampler, m, image, mask, steps, strength, noises)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL


def test_outpainting_keeps_the_original_pixels(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    original = Image.fromarray((np.round(_image(40) * 255)).astype(np.uint8))
    canvas, mask = outpaint_canvas(original, 8, 4, 10, 12)
    assert canvas.size == (64, 56)  # 40 + 8 + 10 = 58, grown to 64; 40 + 4 + 12 = 56
    out = pipe(
        "a landscape",
        image=canvas,
        mask_image=mask,
        num_inference_steps=2,
        seed=0,
        keep_unmasked=True,
        output_type="np",
    ).images[0]
    kept = out[4:44, 8:48]
    np.testing.assert_allclose(kept, np.asarray(original, dtype=np.float32) / 255, atol=1 / 255)
    assert np.abs(out[46:, :] - 127 / 255).max() > 0.05  # the new area was painted, not left grey


def test_inpainting_the_shipped_model_changes_the_shape_and_keeps_the_rest():
    from edgediff.models.shipped import default_bundle
    from training import checker

    pipe = Pipeline.from_bundle(default_bundle(), provider="cpu")
    start = pipe("a large red circle on a blue background", seed=0).images[0]
    assert checker.read(start).colour == "red"
    mask = np.zeros((64, 64), np.uint8)
    region = checker.shape_mask(start)
    mask[region] = 255
    grown = Image.fromarray(mask).filter(ImageFilter.MaxFilter(9))  # the shape and a margin around it
    edited = pipe(
        "a large yellow circle on a blue background",
        image=start,
        mask_image=grown,
        seed=1,
        keep_unmasked=True,
        output_type="np",
    ).images[0]
    keep = np.asarray(grown) < 128
    np.testing.assert_allclose(edited[keep], (np.asarray(start, dtype=np.float32) / 255)[keep], atol=2 / 255)
    inside = edited[np.asarray(grown) >= 128]
    before = (np.asarray(start, dtype=np.float32) / 255)[np.asarray(grown) >= 128]
    assert np.abs(inside.mean(0) - before.mean(0)).max() > 0.1  # the repainted area changed colour


def test_inpaint_arguments_are_checked(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    with pytest.raises(InputError, match="mask_image needs image"):
        pipe("x", mask_image=_mask(64))
    inpainting = Pipeline.from_bundle(tiny_bundle("tiny-sd1-inpaint", models_root), provider="cpu")
    with pytest.raises(InputError, match="inpainting UNet"):
        inpainting("x", seed=0)
