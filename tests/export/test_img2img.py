"""Image-to-image against diffusers' StableDiffusionImg2ImgPipeline on the same image, prompt and noise."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, reference_pipeline  # noqa: E402
from references import gradient_image as _image  # noqa: E402
from replay_noise import ReplayNoise  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import InputError, Pipeline  # noqa: E402
from edgediff.runtime.schedulers import SAMPLERS  # noqa: E402

CASES = [
    ("tiny-sd1", "euler", 4, 0.6, 7.5),
    ("tiny-sd1", "ddim", 5, 0.5, 5.0),
    ("tiny-sd-turbo", "euler", 2, 0.5, 0.0),
    ("tiny-lcm", "lcm", 4, 0.75, 8.0),
    ("tiny-sdxl", "euler", 4, 0.6, 5.0),
    ("tiny-sdxl-turbo", "euler_ancestral", 2, 0.5, 0.0),
]
# the reference pipeline per family kind (SDXL: two text encoders), and the module whose noise it draws


def _reference(monkeypatch, source, sampler, manifest, image, prompt, steps, strength, guidance, noises):
    pipe = reference_pipeline("img2img", source, manifest, sampler, noises, monkeypatch)
    image_t = torch.from_numpy(image.transpose(2, 0, 1)[None].copy())  # [0, 1], already at size: no resampling
    return pipe(
        prompt, image=image_t, strength=strength, num_inference_steps=steps, guidance_scale=guidance, output_type="np"
    ).images


@pytest.mark.parametrize("arch,sampler,steps,strength,guidance", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_img2img_matches_diffusers(models_root, monkeypatch, arch, sampler, steps, strength, guidance):
    pipe = Pipeline.from_bundle(tiny_bundle(arch, models_root), provider="cpu", sampler=sampler)
    m = pipe.manifest
    size = m.defaults["height"]
    image = _image(size)
    lat = (1, m.latent_channels, size // m.vae_scale_factor, size // m.vae_scale_factor)
    rng = np.random.default_rng(7)
    run_steps = min(int(steps * strength), steps)
    noises = [
        rng.standard_normal(lat).astype(np.float32)
        for _ in range(2 + (run_steps if SAMPLERS[sampler].stochastic else 0))
    ]
    ours = pipe(
        "a red circle",
        image=image,
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
        generator=ReplayNoise(noises),
    ).images
    theirs = _reference(
        monkeypatch,
        tiny_source(arch, models_root),
        sampler,
        m,
        image,
        "a red circle",
        steps,
        strength,
        guidance,
        noises,
    )
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    plain = pipe("a red circle", num_inference_steps=steps, guidance_scale=guidance, output_type="np", seed=0).images
    assert np.abs(ours - plain).max() > PIXEL_ATOL  # the image really steered the result


def test_img2img_arguments_are_checked(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    image = _image(pipe.manifest.defaults["height"])
    for strength in (0.0, 1.5, -1):
        with pytest.raises(InputError, match="strength must be in"):
            pipe("x", image=image, strength=strength)
    with pytest.raises(InputError, match="runs no step"):
        pipe("x", image=image, strength=0.1, num_inference_steps=4)
    # the image's own size (rounded to the latent grid) is the default
    out = pipe("x", image=_image(72), strength=0.5, num_inference_steps=2, seed=0)
    assert out.images[0].size == (72, 72)


def test_bundle_without_an_encoder_says_so(models_root, tmp_path):
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle("tiny-sd1", models_root), bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["components"]["vae_encoder"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    pipe("x", seed=0, num_inference_steps=1)  # text-to-image still works
    with pytest.raises(InputError, match="has no vae_encoder"):
        pipe("x", image=_image(pipe.manifest.defaults["height"]), strength=0.5)
