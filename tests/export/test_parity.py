"""Export -> runtime, from fixed latents, against diffusers' own pipeline on the same model."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS, ours_and_diffusers, text_to_image_reference  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Pipeline  # noqa: E402

CASES = [
    # arch, sampler, steps, guidance
    ("tiny-sd1", "euler", 1, 7.5),
    ("tiny-sd1", "euler", 4, 7.5),
    ("tiny-sd1", "ddim", 3, 5.0),
    ("tiny-sd1", "euler_ancestral", 3, 7.5),
    ("tiny-sd2-v", "euler", 3, 7.5),
    ("tiny-sd2-v", "ddim", 1, 7.5),
    ("tiny-sd-turbo", "euler", 1, 0.0),
    ("tiny-sd-turbo", "euler_ancestral", 4, 0.0),
    ("tiny-lcm", "lcm", 1, 8.0),
    ("tiny-lcm", "lcm", 4, 8.0),
    ("tiny-lcm", "tcd", 4, 3.0),
    ("tiny-bk-sdm", "euler", 3, 7.5),  # pruned UNet without a mid-block (BK-SDM, small-sd)
    ("tiny-sdxs", "euler", 1, 0.0),  # one-step student with cross-attention in one block only (SDXS)
]


@pytest.mark.parametrize("arch,sampler,steps,guidance", CASES, ids=[f"{a}-{s}-{n}" for a, s, n, _ in CASES])
def test_runtime_matches_diffusers(models_root, monkeypatch, arch, sampler, steps, guidance):
    pipe = Pipeline.from_bundle(tiny_bundle(arch, models_root), provider="cpu", sampler=sampler)
    ours, theirs = ours_and_diffusers(pipe, tiny_source(arch, models_root), sampler, steps, guidance, monkeypatch)
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    # The comparison must be able to fail: a different sample gives a different image.
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL


def test_negative_prompt_matches_diffusers(models_root, monkeypatch):
    bundle = tiny_bundle("tiny-sd1", models_root)
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    m = pipe.manifest
    latents = (
        np.random.default_rng(5)
        .standard_normal((1, 4, m.defaults["height"] // 2, m.defaults["width"] // 2))
        .astype(np.float32)
    )
    ours = pipe(
        PROMPTS[0], negative_prompt="blurry black", num_inference_steps=2, latents=latents, output_type="np"
    ).images
    theirs = text_to_image_reference(
        tiny_source("tiny-sd1", models_root),
        m.scheduler["name"],
        m,
        PROMPTS[0],
        2,
        m.defaults["guidance"],
        latents,
        monkeypatch,
        [],
        negative="blurry black",
    )
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
