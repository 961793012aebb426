"""Slow, on demand: the full-size SD-Turbo and SDXL-Turbo architectures (random weights) through export
and runtime, against diffusers at 512x512, 1 step.

    python -m pytest -m slow tests/export/test_full_size.py
Set EDGEDIFF_FULL_SIZE_DIR to keep the sources and bundles between runs (~10 GB SD-Turbo, ~27 GB SDXL-Turbo).
"""

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PIXEL_ATOL = 2 / 255


def _full_size(arch: str, root: Path):
    from edgediff.export import export_bundle
    from edgediff.models.random_init import build_random_pipeline

    source, bundle = root / f"{arch}-random", root / f"{arch}-fp32"
    if not (source / "model_index.json").exists():
        build_random_pipeline(arch, source)
    if not (bundle / "manifest.json").exists():
        export_bundle(str(source), bundle, height=512, width=512, progress=False)
    return source, bundle


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return Path(os.environ.get("EDGEDIFF_FULL_SIZE_DIR") or tmp_path_factory.mktemp("full"))


@pytest.mark.parametrize("arch,family", [("sd-turbo", "sd-turbo"), ("sdxl-turbo", "sdxl-turbo")])
def test_full_size_512_one_step_matches_diffusers(root, arch, family):
    from edgediff.export.source import load_pipeline
    from edgediff.runtime import Bundle, Pipeline

    source, bundle = _full_size(arch, root)
    b = Bundle.open(bundle)
    assert b.manifest.family == family and b.manifest.defaults["steps"] == 1
    assert "unet.onnx.data" in b.manifest.components["unet"].files  # > 2 GB: external data inside the bundle
    latents = np.random.default_rng(0).standard_normal((1, 4, 64, 64)).astype(np.float32)
    # closed before the reference loads (both at once need ~28 GB for SDXL); no graph cache: it would write
    # 3-10 GB of optimised graphs into pytest's temporary folders on every run
    with Pipeline(b, provider="cpu", cache=False) as pipe:
        ours = pipe("a photo of a cat", latents=latents, output_type="np", height=512, width=512)
    assert ours.images.shape == (1, 512, 512, 3)

    ref = load_pipeline(str(source))  # StableDiffusion(XL)Pipeline
    ref.scheduler = type(ref.scheduler).from_config(b.manifest.scheduler["config"])
    theirs = ref(
        "a photo of a cat",
        num_inference_steps=1,
        guidance_scale=0.0,
        latents=torch.from_numpy(latents),
        output_type="np",
        height=512,
        width=512,
    ).images
    assert np.abs(ours.images - theirs).max() <= PIXEL_ATOL
