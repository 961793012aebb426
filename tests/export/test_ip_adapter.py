"""IP-Adapter bundles: a tiny random plain IP-Adapter (random image projection and cross-attention layers, a tiny
CLIPVisionModelWithProjection) in h94/IP-Adapter's folder layout, loaded into diffusers with `load_ip_adapter` and
exported with `--ip-adapter`, against diffusers from the same reference image and latents; scale 0; bad input."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from conftest import patch_diffusers_noise  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from references import PIXEL_ATOL, PROMPTS, text_to_image_reference  # noqa: E402
from tiny_models import tiny_bundle, tiny_ip_adapter, tiny_ip_adapter_bundle, tiny_source  # noqa: E402

from edgediff.models.random_init import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME  # noqa: E402
from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402
from edgediff.runtime.ip_adapter import clip_pixels  # noqa: E402

STEPS = 3
SAMPLER = "euler"
GUIDANCE = 5.0
SCALE = 0.6
IMAGES_PER_PROMPT = 2
# CLIPImageProcessor rescales and normalises in float64 before casting; ours in float32
PIXEL_VALUES_ATOL = 1e-5
_PIPELINES = {
    False: ("StableDiffusionPipeline", "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"),
    True: ("StableDiffusionXLPipeline", "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl"),
}


def _reference_picture(width: int = 80, height: int = 60) -> Image.Image:
    """Not square, so that the shortest-side resize and the centre crop both matter."""
    picture = Image.new("RGB", (width, height), (240, 200, 40))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([width // 10, height // 5, width // 2, 4 * height // 5], fill=(30, 40, 210))
    draw.ellipse([width // 2, height // 4, 9 * width // 10, 3 * height // 4], fill=(10, 160, 60))
    return picture


REFERENCE = _reference_picture()


def _latents(manifest, seed=0):
    shape = (
        len(PROMPTS) * IMAGES_PER_PROMPT,
        manifest.latent_channels,
        manifest.defaults["height"] // manifest.vae_scale_factor,
        manifest.defaults["width"] // manifest.vae_scale_factor,
    )
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _diffusers_images(arch, root, manifest, latents, monkeypatch):
    from diffusers import EulerDiscreteScheduler

    sdxl = "text_encoder_2" in manifest.components
    class_name, module_name = _PIPELINES[sdxl]
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, class_name).from_pretrained(str(tiny_source(arch, root)), **extra)
    pipe.load_ip_adapter(
        str(tiny_ip_adapter(arch, root)),
        subfolder=IP_ADAPTER_SUBFOLDER,
        weight_name=IP_ADAPTER_WEIGHT_NAME,
        image_encoder_folder="image_encoder",
    )
    pipe.set_ip_adapter_scale(SCALE)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    patch_diffusers_noise(monkeypatch, importlib.import_module(module_name), [])
    return pipe(
        PROMPTS,
        ip_adapter_image=REFERENCE,
        num_images_per_prompt=IMAGES_PER_PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=torch.from_numpy(latents),
        height=manifest.defaults["height"],
        width=manifest.defaults["width"],
        output_type="np",
    ).images


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_ip_adapter_matches_diffusers(models_root, monkeypatch, arch):
    pipe = Pipeline.from_bundle(tiny_ip_adapter_bundle(arch, models_root), provider="cpu", sampler=SAMPLER)
    latents = _latents(pipe.manifest)
    common = dict(
        num_images_per_prompt=IMAGES_PER_PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=latents,
        output_type="np",
    )
    ours = pipe(PROMPTS, ip_adapter_image=REFERENCE, ip_adapter_scale=SCALE, **common)
    theirs = _diffusers_images(arch, models_root, pipe.manifest, latents, monkeypatch)
    plain = pipe(PROMPTS, **common).images
    assert ours.images.shape == theirs.shape
    assert np.abs(ours.images - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours.images - plain).max() > 10 * PIXEL_ATOL  # the reference image changes the picture
    assert len(ours.timings["image_encoder"]) == 1  # encoded once per call


def test_scale_zero_is_the_plain_image(models_root, monkeypatch):
    """At scale 0 the reference image adds nothing: the same bundle without it, and diffusers' plain pipeline."""
    pipe = Pipeline.from_bundle(tiny_ip_adapter_bundle("tiny-sd1", models_root), provider="cpu", sampler=SAMPLER)
    latents = _latents(pipe.manifest, seed=3)
    common = dict(num_images_per_prompt=IMAGES_PER_PROMPT, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    plain = pipe(PROMPTS, latents=latents, output_type="np", **common).images
    zero = pipe(
        PROMPTS, ip_adapter_image=REFERENCE, ip_adapter_scale=0.0, latents=latents, output_type="np", **common
    ).images
    assert np.array_equal(zero, plain)  # the attention outputs gain exactly 0 * the image's
    theirs = text_to_image_reference(
        tiny_source("tiny-sd1", models_root),
        SAMPLER,
        pipe.manifest,
        [p for p in PROMPTS for _ in range(IMAGES_PER_PROMPT)],
        STEPS,
        GUIDANCE,
        latents,
        monkeypatch,
        [],
    )
    assert np.abs(plain - theirs).max() <= PIXEL_ATOL


@pytest.mark.parametrize("size", [(300, 200), (150, 260), (224, 224)])
def test_pixels_as_clip_image_processor(size):
    from transformers import CLIPImageProcessor

    from edgediff.export.ip_adapter import CLIP_MEAN, CLIP_STD

    picture = _reference_picture(*size)
    theirs = CLIPImageProcessor(size=224, crop_size=224)(picture, return_tensors="np").pixel_values
    ours = clip_pixels(picture, 224, CLIP_MEAN, CLIP_STD)
    assert ours.shape == theirs.shape == (1, 3, 224, 224)
    assert np.abs(ours - theirs).max() <= PIXEL_VALUES_ATOL


def test_manifest_records_the_ip_adapter(models_root):
    m = Bundle.open(tiny_ip_adapter_bundle("tiny-sd1", models_root)).manifest
    entry = m.ip_adapter
    assert (entry["component"], entry["tokens"], entry["image_size"]) == ("image_encoder", 4, 32)
    unet_inputs = {t.name: t.shape for t in m.components["unet"].inputs}
    assert unet_inputs[entry["image_embeds"]][1] == entry["embeds_dim"]
    assert unet_inputs[entry["scale"]] == []  # a scalar graph input: any scale at run time
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks["image_encoder"]) == {"image_embeds"}  # checked against PyTorch like every graph
    assert entry["source"].endswith(IP_ADAPTER_WEIGHT_NAME)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bundle_without_ip_adapter_refuses_the_image(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    with pytest.raises(InputError, match="has no IP-Adapter.*--ip-adapter"):
        pipe("a", ip_adapter_image=REFERENCE, num_inference_steps=1)


def test_bad_scale_or_image(models_root, tmp_path):
    pipe = Pipeline.from_bundle(tiny_ip_adapter_bundle("tiny-sd1", models_root), provider="cpu")
    with pytest.raises(InputError, match="ip_adapter_scale must be a finite number"):
        pipe("a", ip_adapter_image=REFERENCE, ip_adapter_scale=float("nan"), num_inference_steps=1)
    with pytest.raises(InputError, match="ip_adapter_image cannot be read"):
        pipe("a", ip_adapter_image=tmp_path / "missing.png", num_inference_steps=1)


def test_export_options_that_do_not_combine(tmp_path):
    from edgediff.export.ip_adapter import find_weights
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportError, ExportOptionsError

    with pytest.raises(ExportOptionsError, match="int8-static"):
        ExportOptions(ip_adapter="w.safetensors", precision="int8-static")
    with pytest.raises(ExportOptionsError, match="--attention sliced"):
        ExportOptions(ip_adapter="w.safetensors", attention="sliced")
    with pytest.raises(ExportOptionsError, match="apply to --target onnx"):
        ExportOptions(ip_adapter="w.safetensors", target="coreml")
    for name in ("a.safetensors", "b.bin"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ExportError, match="name the weights file.*a.safetensors, b.bin"):
        find_weights(str(tmp_path))


def test_cli_reference_image(models_root, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli.main import cli

    REFERENCE.save(tmp_path / "reference.png")
    runner = CliRunner()
    base = ["generate", "a", "--steps", "1", "--seed", "0"]
    bundle = str(tiny_ip_adapter_bundle("tiny-sd1", models_root))
    reference = ["--ip-adapter-image", str(tmp_path / "reference.png"), "--ip-adapter-scale", "0.8"]
    for name, extra in (("a.png", []), ("b.png", reference)):
        result = runner.invoke(cli, [*base, "--model", bundle, *extra, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a.png").tobytes() != Image.open(tmp_path / "b.png").tobytes()
    plain = str(tiny_bundle("tiny-sd1", models_root))
    result = runner.invoke(cli, [*base, "--model", plain, *reference, "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "has no IP-Adapter" in result.output
