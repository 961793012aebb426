"""IP-Adapter bundles: a tiny random plain IP-Adapter (random image projection and cross-attention layers, a tiny
CLIPVisionModelWithProjection) in h94/IP-Adapter's folder layout, loaded into diffusers with `load_ip_adapter` and
exported with `--ip-adapter`, against diffusers from the same reference image and latents; the same for a tiny
random IP-Adapter Plus (a perceiver resampler over the encoder's penultimate hidden state); scale 0; bad input."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image, ImageDraw  # noqa: E402
from references import PIXEL_ATOL, PROMPTS, text_to_image_reference  # noqa: E402
from replay_noise import patch_diffusers_noise  # noqa: E402
from tiny_models import tiny_bundle, tiny_ip_adapter, tiny_ip_adapter_bundle, tiny_source  # noqa: E402

from edgediff.models.random_init import (  # noqa: E402
    ARCHS,
    IP_ADAPTER_SUBFOLDER,
    IP_ADAPTER_WEIGHT_NAME,
    TINY_IMAGE_ENCODER,
)
from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402
from edgediff.runtime.ip_adapter import clip_pixels  # noqa: E402

STEPS = 3
SAMPLER = "euler"
GUIDANCE = 5.0
SCALE = 0.6
IMAGES_PER_PROMPT = 2
# CLIPImageProcessor rescales and normalises in float64 before casting; ours in float32
PIXEL_VALUES_ATOL = 1e-5
NO_CFG = 1.0  # diffusers guides only above 1
# a tiny IP-Adapter Plus resampler: diffusers fixes 4 blocks of 64-wide heads; 16 queries as the published ones
PLUS_TOKENS, PLUS_WIDTH, PLUS_HEADS, PLUS_DEPTH, HEAD_WIDTH, FFN_RATIO = 16, 48, 2, 4, 64, 4
PLUS_WEIGHT_NAME = "ip-adapter-plus_tiny.safetensors"
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


_PLUS: dict[tuple, object] = {}  # the Plus adapters and bundles, built once per run


def _plus_adapter(arch: str, root):
    """A random IP-Adapter Plus for `arch`'s UNet with the original resampler's key names, beside its own tiny
    encoder, as load_ip_adapter(folder, subfolder="models", ...) reads it."""
    key = ("adapter", arch)
    if key in _PLUS:
        return _PLUS[key]
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = root / f"ip-adapter-plus-{arch}"
    torch.manual_seed(5)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER)).save_pretrained(
        folder / IP_ADAPTER_SUBFOLDER / "image_encoder"
    )
    unet = UNet2DConditionModel(**ARCHS[arch]["unet"])
    cross, width, inner = unet.config.cross_attention_dim, PLUS_WIDTH, PLUS_HEADS * HEAD_WIDTH
    generator = torch.Generator().manual_seed(25)

    def rand(*shape, std=None):  # linear layers at 1/sqrt(fan in), so that the resampler's values stay unit
        return torch.randn(*shape, generator=generator) * (std if std is not None else shape[-1] ** -0.5)

    def norm(prefix, size):
        return {f"{prefix}.weight": 1.0 + rand(size, std=0.1), f"{prefix}.bias": rand(size, std=0.1)}

    weights = {
        "latents": rand(1, PLUS_TOKENS, width),
        "proj_in.weight": rand(width, TINY_IMAGE_ENCODER["hidden_size"]),
        "proj_in.bias": rand(width, std=0.1),
        "proj_out.weight": rand(cross, width),
        "proj_out.bias": rand(cross, std=0.1),
        **norm("norm_out", cross),
    }
    for i in range(PLUS_DEPTH):  # [PerceiverAttention, FeedForward(LayerNorm, Linear, GELU, Linear)]
        weights.update(
            {
                **norm(f"layers.{i}.0.norm1", width),
                **norm(f"layers.{i}.0.norm2", width),
                f"layers.{i}.0.to_q.weight": rand(inner, width),
                f"layers.{i}.0.to_kv.weight": rand(2 * inner, width),
                f"layers.{i}.0.to_out.weight": rand(width, inner),
                **norm(f"layers.{i}.1.0", width),
                f"layers.{i}.1.1.weight": rand(FFN_RATIO * width, width),
                f"layers.{i}.1.3.weight": rand(width, FFN_RATIO * width),
            }
        )
    weights = {f"image_proj.{k}": v for k, v in weights.items()}
    modules = dict(unet.named_modules())
    key_id = 1  # diffusers' numbering: every attention layer counted, the cross-attention ones odd
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = modules[name.removesuffix(".processor")].to_k.weight.shape[0]
            weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross, std=0.3)
            weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross, std=0.3)
            key_id += 2
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / IP_ADAPTER_SUBFOLDER / PLUS_WEIGHT_NAME))
    _PLUS[key] = folder
    return folder


def _plus_bundle(arch: str, root):
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions

    key = ("bundle", arch)
    if key not in _PLUS:
        weights = _plus_adapter(arch, root) / IP_ADAPTER_SUBFOLDER / PLUS_WEIGHT_NAME
        _PLUS[key] = write_onnx_bundle(
            str(tiny_source(arch, root)),
            root / f"bundle-{arch}-ip-adapter-plus",
            ExportOptions(ip_adapter=str(weights)),
            progress=False,
        )
    return _PLUS[key]


def _diffusers_images(arch, root, manifest, latents, monkeypatch, plus=False, guidance=GUIDANCE):
    from diffusers import EulerDiscreteScheduler

    sdxl = "text_encoder_2" in manifest.components
    class_name, module_name = _PIPELINES[sdxl]
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = getattr(diffusers, class_name).from_pretrained(str(tiny_source(arch, root)), **extra)
    pipe.load_ip_adapter(
        str(_plus_adapter(arch, root) if plus else tiny_ip_adapter(arch, root)),
        subfolder=IP_ADAPTER_SUBFOLDER,
        weight_name=PLUS_WEIGHT_NAME if plus else IP_ADAPTER_WEIGHT_NAME,
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
        guidance_scale=guidance,
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


@pytest.mark.parametrize(("arch", "guidance"), [("tiny-sd1", GUIDANCE), ("tiny-sd1", NO_CFG), ("tiny-sdxl", GUIDANCE)])
def test_ip_adapter_plus_matches_diffusers(models_root, monkeypatch, arch, guidance):
    """Plus: the resampler over the penultimate hidden state; with CFG the negative is the zero image's."""
    pipe = Pipeline.from_bundle(_plus_bundle(arch, models_root), provider="cpu", sampler=SAMPLER)
    latents = _latents(pipe.manifest)
    common = dict(
        num_images_per_prompt=IMAGES_PER_PROMPT,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents,
        output_type="np",
    )
    ours = pipe(PROMPTS, ip_adapter_image=REFERENCE, ip_adapter_scale=SCALE, **common)
    theirs = _diffusers_images(arch, models_root, pipe.manifest, latents, monkeypatch, plus=True, guidance=guidance)
    plain = pipe(PROMPTS, **common).images  # no reference image: zero hidden states at scale 0
    assert ours.images.shape == theirs.shape
    assert np.abs(ours.images - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours.images - plain).max() > 10 * PIXEL_ATOL
    assert len(ours.timings["image_encoder"]) == 1  # the reference and the zero image in one run


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


def test_manifest_records_the_plus_kind(models_root):
    m = Bundle.open(_plus_bundle("tiny-sd1", models_root)).manifest
    entry = m.ip_adapter
    assert (entry["kind"], entry["tokens"], entry["encoder_output"]) == (
        "plus",
        PLUS_TOKENS,
        "penultimate_hidden_states",
    )
    patches = (TINY_IMAGE_ENCODER["image_size"] // TINY_IMAGE_ENCODER["patch_size"]) ** 2
    unet_inputs = {t.name: t.shape for t in m.components["unet"].inputs}
    assert unet_inputs[entry["image_embeds"]][1:] == [patches + 1, TINY_IMAGE_ENCODER["hidden_size"]]
    assert [t.name for t in m.components["image_encoder"].outputs] == [entry["encoder_output"]]
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks["image_encoder"]) == {"penultimate_hidden_states"}
    assert Bundle.open(tiny_ip_adapter_bundle("tiny-sd1", models_root)).manifest.ip_adapter["kind"] == "plain"


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


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        (["proj.0.weight", "proj.2.weight", "norm.weight"], "FaceID"),
        (["perceiver_resampler.proj_in.weight", "proj.0.weight"], "FaceID Plus"),
        (["proj.0.weight", "proj.3.weight"], "Full-face"),
    ],
)
def test_unsupported_kinds_are_refused(tmp_path, keys, named):
    from types import SimpleNamespace

    from safetensors.torch import save_file

    from edgediff.export.ip_adapter import load_ip_adapter
    from edgediff.runtime.errors import ExportError

    weights = tmp_path / "ip-adapter-other.safetensors"
    save_file({f"image_proj.{k}": torch.zeros(2, 2) for k in keys}, str(weights))
    with pytest.raises(ExportError, match=f"plain IP-Adapter.*IP-Adapter Plus.*supported; found {named}"):
        load_ip_adapter(str(weights), None, SimpleNamespace(unet=object()), None)


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
