"""FLUX ControlNet bundles: tiny random FluxControlNetModels (InstantX-style: the control image's packed VAE latents
through their own x embedder) exported as graphs of their own for the tiny dev and schnell models, against diffusers'
FluxControlNetPipeline (one ControlNet and two, scales, guidance start and end, true CFG) from the same packed latents
and the same VAE samples of the control image; and what is refused."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS, control_pictures, controlnet_arguments  # noqa: E402
from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from tiny_models import _CACHE, TINY_SIZE, tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, Pipeline  # noqa: E402

STEPS = 4
SEQUENCE_LENGTH = 32  # T5 tokens: short, for speed (both sides)
# random stand-ins for the zero-initialised layers (block projections, the control latents' embedder), so that
# control visibly changes a tiny model's images
ZERO_LAYER_STD = 0.3
VARIANTS = {"dev": "tiny-flux-dev", "schnell": "tiny-flux-schnell"}
# the ControlNets by name: config overrides of the tiny transformer's (1 double-stream block, 1 single-stream) and a
# seed; "pose" has two double-stream blocks, the second of which no transformer block reads, and no single-stream
# ones; the others are refused
STYLES = {
    "canny": ({}, 0),
    "depth": ({}, 1),
    "pose": ({"num_layers": 2, "num_single_layers": 0}, 2),
    "wide": ({"attention_head_dim": 32}, 3),  # twice the transformer's width
    "union": ({"num_mode": 3}, 4),  # controlnet_mode: not supported
}


def tiny_flux_controlnet(root, name: str, variant: str = "dev"):
    """A random FluxControlNetModel folder for the tiny FLUX transformer of `variant` (dev embeds guidance)."""
    from diffusers import FluxControlNetModel

    from edgediff.models.random_init import TINY_FLUX_TRANSFORMER

    key = ("controlnet-flux", name, variant)
    if key not in _CACHE:
        overrides, seed = STYLES[name]
        config = {**TINY_FLUX_TRANSFORMER, "guidance_embeds": variant == "dev", **overrides}
        torch.manual_seed(seed)
        model = FluxControlNetModel(**config)
        with torch.no_grad():
            for layer in [*model.controlnet_blocks, *model.controlnet_single_blocks, model.controlnet_x_embedder]:
                layer.weight.normal_(0.0, ZERO_LAYER_STD)
                layer.bias.normal_(0.0, ZERO_LAYER_STD)
        folder = root / f"controlnet-flux-{variant}-{name}"
        model.save_pretrained(folder)
        _CACHE[key] = folder
    return _CACHE[key]


def _options(root, names, variant="dev"):
    from edgediff.export.options import ExportOptions

    size = TINY_SIZE[VARIANTS[variant]]
    specs = tuple(f"{tiny_flux_controlnet(root, n, variant)}:{n}" for n in names)
    return ExportOptions(controlnets=specs, height=size, width=size)


def tiny_flux_controlnet_bundle(root, names: tuple[str, ...], variant: str = "dev"):
    from edgediff.export.bundle_writer import write_onnx_bundle

    key = ("fp32", VARIANTS[variant], "controlnets", names)
    if key not in _CACHE:
        out = root / f"bundle-flux-{variant}-controlnets-{'-'.join(names)}"
        _CACHE[key] = write_onnx_bundle(
            str(tiny_source(VARIANTS[variant], root)), out, _options(root, names, variant), progress=False
        )
    return _CACHE[key]


CONTROL_IMAGES = control_pictures()


def _grid(manifest):
    side = manifest.defaults["height"] // manifest.vae_scale_factor
    return (len(PROMPTS), manifest.latent_channels, side, side)


def _latents(manifest, seed=0):
    """FluxPipeline's packed latents: (batch, tokens, channels x 4)."""
    b, c, h, w = _grid(manifest)
    return np.random.default_rng(seed).standard_normal((b, (h // 2) * (w // 2), c * 4)).astype(np.float32)


def _vae_noises(manifest, count: int, seed=5) -> list[np.ndarray]:
    """One VAE sample's noise per ControlNet, per image of the batch (on the latent grid, before packing)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(_grid(manifest)).astype(np.float32) for _ in range(count)]


def _diffusers_images(root, manifest, variant, names, scales, starts, ends, latents, noises, extra, monkeypatch):
    import diffusers.models.autoencoders.vae as vae_module
    from diffusers import FluxControlNetModel

    nets = [FluxControlNetModel.from_pretrained(tiny_flux_controlnet(root, n, variant)) for n in names]
    single = len(names) == 1
    pipe = diffusers.FluxControlNetPipeline.from_pretrained(
        str(tiny_source(VARIANTS[variant], root)), controlnet=nets[0] if single else nets
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    patch_diffusers_noise(monkeypatch, vae_module, noises)  # the control images' VAE samples: ours
    images = [CONTROL_IMAGES[n] for n in names]
    return pipe(
        PROMPTS,
        **controlnet_arguments(images, scales, starts, ends),
        num_inference_steps=STEPS,
        latents=torch.from_numpy(latents),
        height=manifest.defaults["height"],
        width=manifest.defaults["width"],
        max_sequence_length=SEQUENCE_LENGTH,
        output_type="np",
        **extra,
    ).images


TRUE_CFG = {"negative_prompt": ["blurry", "a yellow square"], "true_cfg_scale": 4.0}
CASES = [
    # variant, bundle's ControlNets, those used, their scales, guidance starts and ends, other arguments of the call
    ("dev", ("canny", "depth"), ["canny"], [0.8], [0.0], [1.0], {"guidance_scale": 3.5}),
    # FluxMultiControlNetModel
    ("dev", ("canny", "depth"), ["canny", "depth"], [1.0, 0.6], [0.0, 0.25], [0.75, 1.0], {"guidance_scale": 3.5}),
    ("dev", ("pose",), ["pose"], [1.0], [0.25], [0.75], {"guidance_scale": 2.0}),
    ("dev", ("pose",), ["pose"], [1.0], [0.0], [1.0], {"guidance_scale": 3.5, **TRUE_CFG}),  # on the prompt's half
    ("schnell", ("canny",), ["canny"], [0.9], [0.0], [0.75], {"guidance_scale": 0.0}),  # no guidance input
]


@pytest.mark.parametrize(
    "variant,bundle_names,names,scales,starts,ends,extra",
    CASES,
    ids=[
        f"{c[0]}-{'+'.join(c[2])}-{c[4][0]:g}-{c[5][0]:g}{'-true-cfg' if 'true_cfg_scale' in c[6] else ''}"
        for c in CASES
    ],
)
def test_flux_controlnet_matches_diffusers(
    models_root, monkeypatch, variant, bundle_names, names, scales, starts, ends, extra
):
    pipe = Pipeline.from_bundle(tiny_flux_controlnet_bundle(models_root, bundle_names, variant), provider="cpu")
    m = pipe.manifest
    latents = _latents(m)
    noises = _vae_noises(m, len(names))
    single = len(names) == 1
    call = dict(num_inference_steps=STEPS, latents=latents, max_sequence_length=SEQUENCE_LENGTH, output_type="np")
    # one ControlNet by name (a dict); two as lists in the manifest's order, as diffusers' FluxMultiControlNetModel
    ours = pipe(
        PROMPTS,
        control_image={names[0]: CONTROL_IMAGES[names[0]]} if single else [CONTROL_IMAGES[n] for n in names],
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=starts[0] if single else starts,
        control_guidance_end=ends[0] if single else ends,
        generator=ReplayNoise(noises),
        **call,
        **extra,
    ).images
    theirs = _diffusers_images(
        models_root, m, variant, names, scales, starts, ends, latents, noises, extra, monkeypatch
    )
    plain = pipe(PROMPTS, **call, **extra).images
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - plain).max() > 10 * PIXEL_ATOL  # the control changes the image


def test_flux_without_control_is_the_plain_bundle(models_root):
    """The controlled bundle without control_image: the transformer gets zero block samples, and gives the image of
    the bundle exported without ControlNets."""
    pipe = Pipeline.from_bundle(tiny_flux_controlnet_bundle(models_root, ("canny", "depth")), provider="cpu")
    plain = Pipeline.from_bundle(tiny_bundle("tiny-flux-dev", models_root), provider="cpu")
    call = dict(
        num_inference_steps=3,
        guidance_scale=3.5,
        latents=_latents(pipe.manifest, seed=3),
        max_sequence_length=SEQUENCE_LENGTH,
        output_type="np",
    )
    ours = pipe(PROMPTS, **call)
    assert np.abs(ours.images - plain(PROMPTS, **call).images).max() <= PIXEL_ATOL
    assert "controlnet" not in ours.timings  # no ControlNet ran


def test_flux_manifest_lists_the_controlnets(models_root):
    m = Bundle.open(tiny_flux_controlnet_bundle(models_root, ("canny", "depth"))).manifest
    assert [(c["name"], c["control_latents"], c["prompt_only"]) for c in m.controlnets] == [
        ("canny", {"shift_factor": m.vae_shift_factor}, True),  # latents shifted by the VAE's shift
        ("depth", {"shift_factor": m.vae_shift_factor}, True),
    ]
    residuals = m.components["transformer"].attributes["controlnet_residuals"]
    assert [(r["name"], r["level"], r["channels"], r["tokens"]) for r in residuals] == [
        ("controlnet_block_samples_0", 1, 32, True),
        ("controlnet_single_block_samples_0", 1, 32, True),
    ]
    assert {r["name"] for r in residuals} <= {t.name for t in m.components["transformer"].inputs}
    canny = m.components["controlnet_canny"]
    assert [t.name for t in canny.inputs] == [
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
        "guidance",
        "controlnet_cond",
    ]
    assert [t.name for t in canny.outputs] == ["controlnet_block_sample_0", "controlnet_single_block_sample_0"]
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks["controlnet_canny"]) == {t.name for t in canny.outputs}  # checked against PyTorch

    pose = Bundle.open(tiny_flux_controlnet_bundle(models_root, ("pose",))).manifest
    # two double-stream samples; the transformer's one double-stream block reads the first only
    residuals = pose.components["transformer"].attributes["controlnet_residuals"]
    assert [r["name"] for r in residuals] == ["controlnet_block_samples_0", "controlnet_block_samples_1"]
    taken = [t.name for t in pose.components["transformer"].inputs if t.name.startswith("controlnet_")]
    assert taken == ["controlnet_block_samples_0"]


@pytest.mark.parametrize(
    "variant,names,message",
    [
        ("dev", ("wide",), r"ControlNet does not fit: width 64, the transformer's 32"),
        ("dev", ("union",), r"ControlNet does not fit: a union ControlNet \(3 control modes"),
        ("schnell", ("canny",), r"ControlNet does not fit: guidance embedding on, the transformer's off"),
        (
            "dev",
            ("canny", "pose"),
            r"ControlNet does not fit: 2 blocks and 0 single blocks, the first ControlNet's 1 blocks and 1 single",
        ),
    ],
    ids=["wider", "union", "dev-controlnet-on-schnell", "mixed-depths"],
)
def test_flux_controlnet_that_does_not_fit_is_refused(models_root, tmp_path, variant, names, message):
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.runtime.errors import ExportError

    # a ControlNet for dev on schnell: its guidance-embedding config, the schnell transformer's widths
    options = _options(models_root, names, "dev")
    with pytest.raises(ExportError, match=message):
        write_onnx_bundle(str(tiny_source(VARIANTS[variant], models_root)), tmp_path / "b", options, progress=False)
    assert not (tmp_path / "b").exists()
