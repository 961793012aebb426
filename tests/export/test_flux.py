"""FLUX.1 family (schnell, dev): MMDiT transformer over packed 16-channel latents, CLIP-L pooled + T5 text, position
ids, dev's embedded guidance, 16-channel VAE with a shift, flow-matching Euler on FluxPipeline's sigmas (dynamic
shift for dev), true CFG with a negative prompt; against diffusers' FluxPipeline on tiny random models from the same
packed latents."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402
from edgediff.runtime.denoisers.flux import image_ids, pack_latents, unpack_latents  # noqa: E402

VARIANTS = {"schnell": "tiny-flux-schnell", "dev": "tiny-flux-dev"}


def _pipeline(models_root, variant: str) -> Pipeline:
    return Pipeline.from_bundle(tiny_bundle(VARIANTS[variant], models_root), provider="cpu")


def _reference(source, latents, **call):
    """diffusers' images from the same folder, with the model's own scheduler (the bundle must have recorded it)."""
    pipe = diffusers.FluxPipeline.from_pretrained(str(source))
    pipe.set_progress_bar_config(disable=True)
    return pipe(latents=torch.from_numpy(latents), output_type="np", **call).images


CASES = [
    # variant, steps, guidance, (height, width), images per prompt, max_sequence_length
    ("schnell", 1, 0.0, (64, 64), 1, None),  # schnell's own T5 length (256)
    ("schnell", 2, 0.0, (48, 64), 2, 32),  # non-square, a batch per prompt, short T5
    ("dev", 2, 3.5, (64, 64), 1, None),  # dev's embedded guidance, its T5 length (512), dynamic shift
    ("dev", 1, 1.0, (64, 32), 1, 32),
]


@pytest.mark.parametrize(
    "variant,steps,guidance,size,per_prompt,max_sequence_length",
    CASES,
    ids=[f"{c[0]}-{c[1]}-g{c[2]:g}-{c[3][0]}x{c[3][1]}-x{c[4]}" for c in CASES],
)
def test_flux_matches_diffusers(models_root, variant, steps, guidance, size, per_prompt, max_sequence_length):
    pipe = _pipeline(models_root, variant)
    height, width = size
    batch = len(PROMPTS) * per_prompt
    shape = (batch, (height // 16) * (width // 16), 16 * 4)  # FluxPipeline's packed latents
    latents = np.random.default_rng(steps).standard_normal(shape).astype(np.float32)
    call = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        num_images_per_prompt=per_prompt,
    )
    length = {} if max_sequence_length is None else {"max_sequence_length": max_sequence_length}
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call, **length).images
    if max_sequence_length is None:  # diffusers' own default is 512 for both: pass the bundle's
        length = {"max_sequence_length": pipe.manifest.conditioning["max_sequence_length"]}
    theirs = _reference(tiny_source(VARIANTS[variant], models_root), latents, prompt=PROMPTS, **call, **length)
    assert ours.shape == theirs.shape == (batch, height, width, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts and latents: different images


NEGATIVES = ["blurry", "a yellow square"]
TRUE_CFG_CASES = [
    # variant, steps, guidance, true_cfg_scale, images per prompt, negative_prompt_2
    ("dev", 2, 3.5, 2.0, 1, None),  # true CFG on top of dev's embedded guidance
    ("schnell", 2, 0.0, 3.0, 2, ["low quality", "noise"]),  # a batch per prompt; T5's own negatives
]


@pytest.mark.parametrize(
    "variant,steps,guidance,true_cfg_scale,per_prompt,negative_2",
    TRUE_CFG_CASES,
    ids=[f"{c[0]}-{c[1]}-g{c[2]:g}-true{c[3]:g}-x{c[4]}" for c in TRUE_CFG_CASES],
)
def test_true_cfg_matches_diffusers(models_root, variant, steps, guidance, true_cfg_scale, per_prompt, negative_2):
    pipe = _pipeline(models_root, variant)
    batch = len(PROMPTS) * per_prompt
    latents = np.random.default_rng(5).standard_normal((batch, 16, 64)).astype(np.float32)  # 64x64 pixels
    call = dict(
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=64,
        width=64,
        num_images_per_prompt=per_prompt,
        max_sequence_length=32,
    )
    negative = dict(negative_prompt=NEGATIVES, negative_prompt_2=negative_2, true_cfg_scale=true_cfg_scale)
    ours = pipe(PROMPTS, latents=latents, output_type="np", **call, **negative).images
    source = tiny_source(VARIANTS[variant], models_root)
    theirs = _reference(source, latents, prompt=PROMPTS, **call, **negative)
    assert ours.shape == theirs.shape == (batch, 64, 64, 3)
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    plain = pipe(PROMPTS, latents=latents, output_type="np", **call).images
    assert np.abs(ours - plain).max() > PIXEL_ATOL  # the negative batch changed the images


def test_true_cfg_runs_only_as_in_flux_pipeline(models_root):
    """As FluxPipeline: no negative_prompt (negative_prompt_2 alone included), or a scale of 1, leaves the images
    as they are without true CFG."""
    pipe = _pipeline(models_root, "dev")
    latents = np.random.default_rng(0).standard_normal((1, 16, 64)).astype(np.float32)
    call = dict(latents=latents, num_inference_steps=1, height=64, width=64, output_type="np", max_sequence_length=32)
    plain = pipe("a red circle", **call).images
    for options in (
        dict(true_cfg_scale=4.0),
        dict(true_cfg_scale=4.0, negative_prompt_2="blurry"),
        dict(true_cfg_scale=1.0, negative_prompt="blurry"),
        dict(negative_prompt="blurry"),
    ):
        assert np.array_equal(pipe("a red circle", **call, **options).images, plain), options


def test_true_cfg_refusals(models_root, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli.main import cli

    pipe = _pipeline(models_root, "schnell")
    for value in (0.5, 0.0, -2.0, float("inf"), float("nan"), "2", True):
        with pytest.raises(InputError, match=r"true_cfg_scale must be a finite number >= 1 .*got"):
            pipe("a red circle", negative_prompt="blurry", true_cfg_scale=value, num_inference_steps=1)
    bundle = str(tiny_bundle(VARIANTS["schnell"], models_root))
    args = ["generate", "x", "--model", bundle, "--negative-prompt", "blurry", "--true-cfg-scale", "0.5"]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        "error: true_cfg_scale must be a finite number >= 1 (1: off; above 1 it runs with a negative_prompt), got 0.5"
        in (result.output)
    )


def test_guidance_is_embedded_for_dev_and_ignored_by_schnell(models_root):
    shape = (1, 16, 64)  # 64x64 pixels: 4x4 tokens
    latents = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    call = dict(latents=latents, num_inference_steps=1, height=64, width=64, output_type="np")
    schnell = _pipeline(models_root, "schnell")
    a, b = (schnell("a red circle", guidance_scale=g, **call).images for g in (0.0, 7.0))
    assert np.array_equal(a, b)
    dev = _pipeline(models_root, "dev")
    a, b = (dev("a red circle", guidance_scale=g, **call).images for g in (1.0, 7.0))
    assert np.abs(a - b).max() > PIXEL_ATOL


def test_packing_ids_and_sigmas_match_flux_pipeline(models_root):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    grid = np.random.default_rng(0).standard_normal((2, 16, 6, 4)).astype(np.float32)
    theirs = diffusers.FluxPipeline._pack_latents(torch.from_numpy(grid), 2, 16, 6, 4).numpy()
    assert np.array_equal(pack_latents(grid, 2), theirs)
    back = diffusers.FluxPipeline._unpack_latents(torch.from_numpy(theirs), 48, 32, 8).numpy()
    assert np.array_equal(unpack_latents(theirs, 3, 2, 2), back) and np.array_equal(back, grid)
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 3, 2, "cpu", torch.float32).numpy()
    assert np.array_equal(image_ids(3, 2), ids)

    # dev's dynamic shift at the full size: mu from 4096 tokens, FluxPipeline's sigmas, 28 steps
    pipe = _pipeline(models_root, "dev")
    from edgediff.runtime.schedulers import make_sampler

    config = pipe.manifest.scheduler["config"]
    ours = make_sampler("flow_euler", config)
    ours.set_timesteps(28, **pipe.denoiser.schedule(ours, 28, 1024, 1024))
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(
        str(tiny_source(VARIANTS["dev"], models_root)), subfolder="scheduler"
    )
    mu = calculate_shift(4096, 256, 4096, 0.5, 1.15)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())


def test_flux_manifest_records_what_the_runtime_needs(models_root):
    for variant, family, steps, guidance, length in (
        ("schnell", "flux-schnell", 4, 0.0, 256),
        ("dev", "flux-dev", 28, 3.5, 512),
    ):
        b = Bundle.open(tiny_bundle(VARIANTS[variant], models_root))
        m = b.manifest
        assert (m.family, m.prediction_type, m.latent_channels, m.denoiser, m.latent_packing) == (
            family,
            "flow_prediction",
            16,
            "transformer",
            2,
        )
        assert (m.defaults["steps"], m.defaults["guidance"]) == (steps, guidance)
        assert (m.vae_scaling_factor, m.vae_shift_factor) == (0.3611, 0.1159)
        config = m.scheduler["config"]
        assert m.scheduler["name"] == "flow_euler"
        assert config["use_dynamic_shifting"] is (variant == "dev")
        assert (
            config["base_shift"],
            config["max_shift"],
            config["base_image_seq_len"],
            config["max_image_seq_len"],
        ) == (
            0.5,
            1.15,
            256,
            4096,
        )
        c = m.conditioning
        assert (c["joint"], c["max_sequence_length"], c["guidance_embedding"]) == ("flux", length, variant == "dev")
        assert c["ids"] == {"image": "zero-row-col", "text": "zeros"}
        clip, t5 = c["encoders"]
        assert (clip["component"], clip["pooled"]) == ("text_encoder", "pooler_output")  # CLIP-L pooled only
        assert (t5["component"], t5["output"], t5["tokenizer"]["file"]) == (
            "text_encoder_2",
            "last_hidden_state",
            "tokenizer_2.json",
        )
        assert "pooled" not in t5 and "text_encoder_3" not in m.components
        inputs = {t.name: t.shape for t in m.components["transformer"].inputs}
        assert inputs["hidden_states"][2] == 64 and inputs["pooled_projections"][1] == 32
        assert inputs["encoder_hidden_states"][2] == 96
        assert len(inputs["img_ids"]) == len(inputs["txt_ids"]) == 2  # diffusers 0.39: ids without a batch axis
        assert ("guidance" in inputs) is (variant == "dev")
        # packed image tokens are a dynamic axis: the transformer is traced and checked at other grids than the
        # bundle's, as the UNet is
        assert set(m.provenance["export_check"]["size"]["transformer"]) == {"height", "width", "full_size"}
        checks = json.loads((b.path / "manifest.json").read_text())["provenance"]["export_check"]["max_rel_diff"]
        assert set(checks) == {"text_encoder", "text_encoder_2", "transformer", "vae_decoder", "vae_encoder"}


def test_flux_families_are_detected_from_configs(models_root):
    from edgediff.export.families import detect_family, get_family
    from edgediff.export.source import load_pipeline, source_facts

    for variant, family in (("schnell", "flux-schnell"), ("dev", "flux-dev")):
        facts = source_facts(load_pipeline(str(tiny_source(VARIANTS[variant], models_root))), "some/model")
        assert facts.transformer_class == "FluxTransformer2DModel"
        assert facts.guidance_embeds is (variant == "dev")
        assert detect_family(facts).name == family
    schnell, dev = get_family("flux-schnell"), get_family("flux-dev")
    assert (schnell.default_steps, schnell.default_guidance, schnell.guidance_embedding) == (4, 0.0, False)
    assert (dev.default_steps, dev.default_guidance, dev.guidance_embedding) == (28, 3.5, True)
    assert schnell.default_size == dev.default_size == 1024 and schnell.sampler == dev.sampler == "flow_euler"


def test_flux_refusals(models_root, tmp_path):
    pipe = _pipeline(models_root, "schnell")
    with pytest.raises(InputError, match=r"width must be a multiple of 16 .*got 56; nearest valid: 48 or 64"):
        pipe("a red circle", width=56, num_inference_steps=1)
    with pytest.raises(InputError, match=r"height must be a multiple of 16 .*got 8; nearest valid: 16$"):
        pipe("a red circle", height=8, num_inference_steps=1)
    with pytest.raises(InputError, match="max_sequence_length must be between 1 and 512"):
        pipe("a red circle", max_sequence_length=600, num_inference_steps=1)
    with pytest.raises(InputError, match=r"latents must have shape \(1, 16, 64\), got \(1, 16, 8, 8\)"):
        pipe("a red circle", latents=np.zeros((1, 16, 8, 8), np.float32), height=64, width=64, num_inference_steps=1)
    image = np.zeros((64, 64, 3), np.float32)
    with pytest.raises(InputError, match=r"mask_image= .* is not available for flux-schnell bundles"):
        pipe("a red circle", image=image, mask_image=image[..., 0], num_inference_steps=1)

    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    source = str(tiny_source(VARIANTS["schnell"], models_root))
    with pytest.raises(ExportOptionsError, match="--no-t5 is not available for FLUX models"):
        export(source, tmp_path / "b", ExportOptions(t5=False), False)
    with pytest.raises(ExportOptionsError, match="--attention sliced is not available for flux-schnell models"):
        export(source, tmp_path / "b", ExportOptions(attention="sliced"), False)
    assert not (tmp_path / "b").exists()


def test_flux_latent_output_and_callbacks_are_on_the_grid(models_root):
    pipe = _pipeline(models_root, "schnell")
    seen = []
    out = pipe(
        "a red circle",
        seed=3,
        num_inference_steps=2,
        height=64,
        width=32,
        output_type="latent",
        callback=lambda e: seen.append(e.latents.shape),
    )
    assert out.images.shape == (1, 16, 8, 4) and seen == [(1, 16, 8, 4)] * 2
    images = pipe.decode(out.images, output_type="np")
    again = pipe("a red circle", seed=3, num_inference_steps=2, height=64, width=32, output_type="np").images
    assert np.abs(images - again).max() <= PIXEL_ATOL
