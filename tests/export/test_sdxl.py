"""SDXL family: two text encoders, pooled text and size micro-conditioning, against diffusers'
StableDiffusionXLPipeline on tiny random models (base, Turbo and LCM settings)."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import (  # noqa: E402
    PIXEL_ATOL,
    PROMPTS,
    reference_pipeline,  # noqa: E402
)
from replay_noise import ReplayNoise  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, BundleError, Pipeline  # noqa: E402
from edgediff.runtime.schedulers import SAMPLERS  # noqa: E402


def _reference(
    source, sampler, manifest, steps, guidance, latents, noises, monkeypatch, height, width, negative=None, per_prompt=1
):
    pipe = reference_pipeline("text2img", source, manifest, sampler, noises, monkeypatch)
    return pipe(
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        output_type="np",
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
    ).images


CASES = [
    # arch, sampler, steps, guidance, negative prompt, (height, width), images per prompt
    ("tiny-sdxl", "euler", 3, 5.0, None, (64, 64), 1),  # no negative: zeros as the unconditional input
    ("tiny-sdxl", "euler", 2, 5.0, ["blurry", "dark"], (64, 64), 1),  # negative prompts through both encoders
    ("tiny-sdxl", "euler", 2, 5.0, None, (48, 64), 2),  # non-square: size conditions; a batch per prompt
    ("tiny-sdxl-turbo", "euler_ancestral", 1, 0.0, None, (64, 64), 1),
    ("tiny-sdxl-turbo", "euler_ancestral", 4, 0.0, None, (64, 64), 1),
    ("tiny-sdxl-lightning", "euler", 4, 0.0, None, (64, 64), 1),  # Euler, trailing, no guidance
    ("tiny-sdxl-lightning", "euler", 2, 0.0, None, (64, 64), 1),
    ("tiny-sdxl-lcm", "lcm", 4, 8.0, None, (64, 64), 1),  # guidance as an embedding
]


@pytest.mark.parametrize(
    "arch,sampler,steps,guidance,negative,size,per_prompt",
    CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)],
)
def test_sdxl_matches_diffusers(models_root, monkeypatch, arch, sampler, steps, guidance, negative, size, per_prompt):
    pipe = Pipeline.from_bundle(tiny_bundle(arch, models_root), provider="cpu", sampler=sampler)
    m = pipe.manifest
    height, width = size
    shape = (len(PROMPTS) * per_prompt, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
    rng = np.random.default_rng(steps)
    latents = rng.standard_normal(shape).astype(np.float32)
    noises = (
        [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)] if SAMPLERS[sampler].stochastic else []
    )

    ours = pipe(
        PROMPTS,
        negative_prompt=negative,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=latents,
        output_type="np",
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
        generator=ReplayNoise(noises),
    ).images
    theirs = _reference(
        tiny_source(arch, models_root),
        sampler,
        m,
        steps,
        guidance,
        latents,
        noises,
        monkeypatch,
        height,
        width,
        negative,
        per_prompt,
    )
    assert ours.shape == theirs.shape == (shape[0], height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts and latents: different images


def test_sdxl_manifest_and_families(models_root):
    from edgediff.export.families import detect_family
    from edgediff.export.source import load_pipeline, source_facts

    m = Bundle.open(tiny_bundle("tiny-sdxl", models_root)).manifest
    assert m.family == "sdxl" and m.defaults["guidance"] == 5.0
    first, second = m.conditioning["encoders"]
    assert (first["component"], second["component"], second["pooled"]) == (
        "text_encoder",
        "text_encoder_2",
        "text_embeds",
    )
    # OpenCLIP-bigG's tokenizer pads with "!" (id 0), CLIP-L's with its end token: each keeps its own
    assert (
        second["tokenizer"]["file"] == "tokenizer_2.json"
        and second["tokenizer"]["pad_id"] != first["tokenizer"]["pad_id"]
    )
    assert m.conditioning["zero_negative"] is True
    unet_inputs = {t.name: t.shape for t in m.components["unet"].inputs}
    assert unet_inputs["text_embeds"][1] == 24 and unet_inputs["time_ids"][1] == 6
    assert unet_inputs["encoder_hidden_states"][2] == 32 + 48  # both encoders' widths

    # Turbo: its own row, trained at 512 (exported here at the tiny model's size), trailing schedule
    turbo = Bundle.open(tiny_bundle("tiny-sdxl-turbo", models_root)).manifest
    assert (turbo.family, turbo.scheduler["name"], turbo.defaults["steps"]) == ("sdxl-turbo", "euler_ancestral", 1)
    assert turbo.scheduler["config"]["timestep_spacing"] == "trailing"
    assert Bundle.open(tiny_bundle("tiny-sdxl-lcm", models_root)).manifest.family == "sdxl-lcm"
    lightning = Bundle.open(tiny_bundle("tiny-sdxl-lightning", models_root)).manifest
    assert (lightning.family, lightning.defaults["steps"], lightning.defaults["guidance"]) == ("sdxl-lightning", 4, 0.0)
    facts = source_facts(load_pipeline(str(tiny_source("tiny-sdxl", models_root))), "stabilityai/sdxl-turbo")
    assert detect_family(facts).name == "sdxl-turbo" and detect_family(facts).default_size == 512
    assert (
        detect_family(facts.__class__(**{**facts.__dict__, "name": "ByteDance/SDXL-Lightning"})).name
        == "sdxl-lightning"
    )


def test_sdxl_conditioning_reaches_the_unet(models_root):
    """The pooled text and the size conditions are inputs the UNet really uses (not fed and ignored)."""
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sdxl", models_root), provider="cpu")
    latents = np.random.default_rng(0).standard_normal((1, 4, 32, 32)).astype(np.float32)
    base = pipe("a red circle", latents=latents, num_inference_steps=2, guidance_scale=0.0, output_type="np").images
    with_neg = pipe("a red circle", latents=latents, num_inference_steps=2, guidance_scale=5.0, output_type="np").images
    assert np.abs(base - with_neg).max() > PIXEL_ATOL
    feeds = pipe.text(["a red circle"], None, False, 1, 64, 64, {})
    other = pipe.text(["a red circle"], None, False, 1, 48, 64, {})
    assert feeds["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] and other["time_ids"].tolist() == [
        [48, 64, 0, 0, 48, 64]
    ]
    unet = pipe.sessions.get("unet")
    sample = latents
    out_a = unet.run(sample=sample, timestep=np.array(500, np.float32), **feeds)[0]
    out_b = unet.run(sample=sample, timestep=np.array(500, np.float32), **other)[0]
    out_c = unet.run(
        sample=sample,
        timestep=np.array(500, np.float32),
        **{**feeds, "text_embeds": np.zeros_like(feeds["text_embeds"])},
    )[0]
    assert np.abs(out_a - out_b).max() > 1e-4 and np.abs(out_a - out_c).max() > 1e-4


def test_sdxl_bundle_without_its_second_tokenizer_is_refused(models_root, tmp_path):
    broken = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("tiny-sdxl", models_root), broken)
    (broken / "tokenizer_2.json").unlink()
    with pytest.raises(BundleError, match="tokenizer_2.json"):
        Bundle.open(broken)
    manifest = json.loads((tiny_bundle("tiny-sdxl", models_root) / "manifest.json").read_text())
    del manifest["components"]["text_encoder_2"]
    shutil.copy(tiny_bundle("tiny-sdxl", models_root) / "tokenizer_2.json", broken)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="no text_encoder_2 component"):
        Bundle.open(broken)


def test_sdxl_int8_quantises_both_text_encoders(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sdxl", models_root, "int8"), provider="cpu")
    components = pipe.manifest.components
    assert components["text_encoder"].precision == components["text_encoder_2"].precision == "int8"
    image = pipe("a red circle", seed=0, num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()


def test_fp16_bundle_keeps_an_overflowing_vae_in_fp32_and_takes_a_fixed_one(models_root, tmp_path):
    """SDXL's VAE overflows in fp16: an fp16 export detects it (its fp16 graph fails the check), keeps the VAE
    in fp32 and says why; a replacement VAE that stays finite (as sdxl-vae-fp16-fix) is taken in fp16."""
    from diffusers import AutoencoderKL

    from edgediff.export import export_bundle

    source = tmp_path / "src"
    shutil.copytree(tiny_source("tiny-sdxl", models_root), source)
    vae = AutoencoderKL.from_pretrained(source / "vae")
    with torch.no_grad():  # activations past fp16's 65504 in the decoder's first convolution
        vae.decoder.conv_in.weight.mul_(1e5)
        vae.decoder.conv_in.bias.mul_(1e5)
    vae.save_pretrained(source / "vae")

    overflowing = Bundle.open(export_bundle(str(source), tmp_path / "fp16", precision="fp16", progress=False))
    c = overflowing.manifest.components
    assert c["unet"].precision == "fp16" and c["vae_encoder"].precision == "fp16"
    assert c["vae_decoder"].precision == "fp32" and c["vae_decoder"].attributes["fp16"].startswith("kept fp32")
    image = Pipeline(overflowing)("a red circle", seed=0, num_inference_steps=2, output_type="np").images
    assert np.isfinite(image).all()

    fixed_vae = tiny_source("tiny-sdxl", models_root) / "vae"
    fixed = Bundle.open(
        export_bundle(str(source), tmp_path / "fp16-fixed", precision="fp16", progress=False, vae=str(fixed_vae))
    )
    assert fixed.manifest.components["vae_decoder"].precision == "fp16"
    assert "fp16" not in fixed.manifest.components["vae_decoder"].attributes
    assert (fixed.path / fixed.manifest.provenance["vae"]).resolve() == fixed_vae.resolve()  # relative to the bundle
