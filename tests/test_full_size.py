"""Slow, on demand: the full-size SD-Turbo architecture (random weights) through export and runtime.

    python -m pytest -m slow tests/test_full_size.py
Set EDGEDIFF_FULL_SIZE_DIR to keep the ~10 GB of source and bundle between runs.
"""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PIXEL_ATOL = 2 / 255


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    from edgediff.export import export_bundle
    from edgediff.models.random_init import build_random_pipeline

    root = Path(os.environ.get("EDGEDIFF_FULL_SIZE_DIR") or tmp_path_factory.mktemp("full"))
    source, bundle = root / "sd-turbo-random", root / "sd-turbo-fp32"
    if not (source / "model_index.json").exists():
        build_random_pipeline("sd-turbo", source)
    if not (bundle / "manifest.json").exists():
        export_bundle(str(source), bundle, height=512, width=512, progress=False)
    return source, bundle


def test_sd_turbo_full_size_512_one_step_matches_diffusers(full_size):
    from edgediff.runtime import Bundle, Pipeline

    source, bundle = full_size
    b = Bundle.open(bundle)
    assert b.manifest.family == "sd-turbo" and b.manifest.defaults["steps"] == 1
    assert "unet.onnx.data" in b.manifest.components["unet"].files  # > 2 GB: external data inside the bundle
    pipe = Pipeline(b, provider="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    ours = pipe("a photo of a cat", latents=latents, output_type="np")
    assert ours.images.shape == (1, 512, 512, 3)

    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(source), safety_checker=None, requires_safety_checker=False)
    theirs = ref("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(latents),
                 output_type="np").images
    assert np.abs(ours.images - theirs).max() <= PIXEL_ATOL
