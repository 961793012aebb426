"""SD3 ControlNet bundles: tiny random SD3ControlNetModels (InstantX-style, with zeros for the pooled text, and
SD3.5-style, reading no text and taking the transformer's patch embedding) exported as graphs of their own, against
diffusers' StableDiffusion3ControlNetPipeline (one ControlNet and two, scales, guidance start and end) from the same
latents and the same VAE samples of the control image; and what is refused."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL, PROMPTS, control_pictures, controlnet_arguments  # noqa: E402
from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from tiny_models import _CACHE, tiny_sd3_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, Pipeline  # noqa: E402

STEPS = 4
# random stand-ins for the zero-initialised layers (block projections, the control image's patch embedding), so
# that control visibly changes a tiny model's images
ZERO_LAYER_STD = 0.3
# the ControlNets by name: config overrides of the tiny transformer's and a seed; "pose" is SD3.5-style (no text,
# no patch embedding of its own, the pooled text and the VAE's shift kept) and as deep as the transformer, whose last
# block adds no block sample; the others InstantX-style
STYLES = {
    "canny": ({}, 0),
    "depth": ({}, 1),
    "pose": (
        {
            "joint_attention_dim": None,
            "use_pos_embed": False,
            "force_zeros_for_pooled_projection": False,
            "num_layers": 2,
        },
        2,
    ),
    "wide": ({"attention_head_dim": 16}, 3),  # twice the transformer's width
    "deep": ({"num_layers": 3}, 4),  # more blocks than the tiny transformer's 2
}


def tiny_sd3_controlnet(root, name: str):
    """A random SD3ControlNetModel folder for the tiny SD3 transformer (one block unless STYLES says otherwise)."""
    from diffusers import SD3ControlNetModel

    from edgediff.models.random_init import TINY_SD3_TRANSFORMER

    key = ("controlnet-sd3", name)
    if key not in _CACHE:
        overrides, seed = STYLES[name]
        config = {k: v for k, v in TINY_SD3_TRANSFORMER.items() if k != "out_channels"}
        config.update({"num_layers": 1, **overrides})
        torch.manual_seed(seed)
        model = SD3ControlNetModel(**config)
        with torch.no_grad():
            for layer in [*model.controlnet_blocks, model.pos_embed_input.proj]:
                layer.weight.normal_(0.0, ZERO_LAYER_STD)
                layer.bias.normal_(0.0, ZERO_LAYER_STD)
        folder = root / f"controlnet-sd3-{name}"
        model.save_pretrained(folder)
        _CACHE[key] = folder
    return _CACHE[key]


def tiny_sd3_controlnet_bundle(root, names: tuple[str, ...]):
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions

    key = ("fp32", "tiny-sd3", "controlnets", names)
    if key not in _CACHE:
        specs = tuple(f"{tiny_sd3_controlnet(root, n)}:{n}" for n in names)
        out = root / f"bundle-sd3-controlnets-{'-'.join(names)}"
        _CACHE[key] = write_onnx_bundle(
            str(tiny_source("tiny-sd3", root)), out, ExportOptions(controlnets=specs), progress=False
        )
    return _CACHE[key]


CONTROL_IMAGES = control_pictures()


def _latents(manifest, seed=0):
    side = manifest.defaults["height"] // manifest.vae_scale_factor
    shape = (len(PROMPTS), manifest.latent_channels, side, side)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _vae_noises(manifest, count: int, seed=5) -> list[np.ndarray]:
    """One VAE sample's noise per ControlNet, per image of the batch (our side; diffusers' repeats it for CFG)."""
    side = manifest.defaults["height"] // manifest.vae_scale_factor
    rng = np.random.default_rng(seed)
    shape = (len(PROMPTS), manifest.latent_channels, side, side)
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]


def _diffusers_images(root, manifest, names, scales, starts, ends, latents, noises, guidance, monkeypatch):
    import diffusers.models.autoencoders.vae as vae_module
    from diffusers import SD3ControlNetModel

    nets = [SD3ControlNetModel.from_pretrained(tiny_sd3_controlnet(root, n)) for n in names]
    single = len(names) == 1
    pipe = diffusers.StableDiffusion3ControlNetPipeline.from_pretrained(
        str(tiny_source("tiny-sd3", root)), controlnet=nets[0] if single else nets
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    # the control images' VAE samples: ours, for both halves of classifier-free guidance
    patch_diffusers_noise(monkeypatch, vae_module, [np.concatenate([n, n]) if guidance > 1 else n for n in noises])
    images = [CONTROL_IMAGES[n] for n in names]
    return pipe(
        PROMPTS,
        **controlnet_arguments(images, scales, starts, ends),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        height=manifest.defaults["height"],
        width=manifest.defaults["width"],
        output_type="np",
    ).images


CASES = [
    # bundle's ControlNets, those used, their scales, guidance starts and ends, CFG guidance
    (("canny", "depth"), ["canny"], [0.8], [0.0], [1.0], 5.0),
    (("canny", "depth"), ["canny", "depth"], [1.0, 0.6], [0.0, 0.25], [0.75, 1.0], 5.0),  # SD3MultiControlNetModel
    (("pose",), ["pose"], [1.0], [0.25], [0.75], 5.0),
    (("pose",), ["pose"], [0.7], [0.0], [0.5], 1.0),  # no CFG
]


@pytest.mark.parametrize(
    "bundle_names,names,scales,starts,ends,guidance",
    CASES,
    ids=[f"{'+'.join(c[1])}-{c[3][0]:g}-{c[4][0]:g}-cfg{c[5]:g}" for c in CASES],
)
def test_sd3_controlnet_matches_diffusers(
    models_root, monkeypatch, bundle_names, names, scales, starts, ends, guidance
):
    pipe = Pipeline.from_bundle(tiny_sd3_controlnet_bundle(models_root, bundle_names), provider="cpu")
    m = pipe.manifest
    latents = _latents(m)
    noises = _vae_noises(m, len(names))
    single = len(names) == 1
    # one ControlNet by name (a dict); two as lists in the manifest's order, as diffusers' SD3MultiControlNetModel
    ours = pipe(
        PROMPTS,
        control_image={names[0]: CONTROL_IMAGES[names[0]]} if single else [CONTROL_IMAGES[n] for n in names],
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=starts[0] if single else starts,
        control_guidance_end=ends[0] if single else ends,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents,
        generator=ReplayNoise(noises),
        output_type="np",
    ).images
    theirs = _diffusers_images(models_root, m, names, scales, starts, ends, latents, noises, guidance, monkeypatch)
    plain = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents, output_type="np").images
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - plain).max() > 10 * PIXEL_ATOL  # the control changes the image


def test_sd3_without_control_is_the_plain_bundle(models_root):
    """The controlled bundle without control_image: the transformer gets zero block samples, and gives the image of
    the bundle exported without ControlNets."""
    pipe = Pipeline.from_bundle(tiny_sd3_controlnet_bundle(models_root, ("canny", "depth")), provider="cpu")
    plain = Pipeline.from_bundle(tiny_sd3_bundle(models_root), provider="cpu")
    latents = _latents(pipe.manifest, seed=3)
    call = dict(num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="np")
    ours = pipe(PROMPTS, **call)
    assert np.abs(ours.images - plain(PROMPTS, **call).images).max() <= PIXEL_ATOL
    assert "controlnet" not in ours.timings  # no ControlNet ran


def test_sd3_manifest_lists_the_controlnets(models_root):
    m = Bundle.open(tiny_sd3_controlnet_bundle(models_root, ("canny", "depth"))).manifest
    assert [(c["name"], c["component"], c["control_latents"]) for c in m.controlnets] == [
        ("canny", "controlnet_canny", {"shift_factor": 0.0}),  # InstantX-style: latents without the VAE's shift
        ("depth", "controlnet_depth", {"shift_factor": 0.0}),
    ]
    residuals = m.components["transformer"].attributes["controlnet_residuals"]
    assert [(r["name"], r["level"], r["channels"], r["tokens"]) for r in residuals] == [
        ("block_controlnet_hidden_states_0", 1, 32, True)
    ]
    assert {r["name"] for r in residuals} <= {t.name for t in m.components["transformer"].inputs}
    canny = m.components["controlnet_canny"]
    # zeros for the pooled text inside the graph: it takes no pooled_projections
    assert [t.name for t in canny.inputs] == ["hidden_states", "timestep", "encoder_hidden_states", "controlnet_cond"]
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks["controlnet_canny"]) == {t.name for t in canny.outputs}  # checked against PyTorch

    pose = Bundle.open(tiny_sd3_controlnet_bundle(models_root, ("pose",))).manifest
    assert pose.controlnets[0]["control_latents"] == {"shift_factor": pose.vae_shift_factor}
    # two block samples; the transformer's second (last) block adds none, so its graph takes the first only
    assert len(pose.components["controlnet_pose"].outputs) == 2
    residuals = pose.components["transformer"].attributes["controlnet_residuals"]
    assert [r["name"] for r in residuals] == ["block_controlnet_hidden_states_0", "block_controlnet_hidden_states_1"]
    taken = [t.name for t in pose.components["transformer"].inputs if t.name.startswith("block_")]
    assert taken == ["block_controlnet_hidden_states_0"]
    assert [t.name for t in pose.components["controlnet_pose"].inputs] == [
        "hidden_states",
        "timestep",
        "pooled_projections",
        "controlnet_cond",
    ]


@pytest.mark.parametrize(
    "names,message",
    [
        (("wide",), r"ControlNet does not fit: width 64, the transformer's 32"),
        (("deep",), r"ControlNet does not fit: 3 blocks, more than the transformer's 2"),
        (("canny", "pose"), r"ControlNet does not fit: 2 blocks, the first ControlNet's 1"),
    ],
    ids=["wider", "deeper", "mixed-depths"],
)
def test_sd3_controlnet_that_does_not_fit_is_refused(models_root, tmp_path, names, message):
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportError

    options = ExportOptions(controlnets=tuple(f"{tiny_sd3_controlnet(models_root, n)}:{n}" for n in names))
    with pytest.raises(ExportError, match=message):
        write_onnx_bundle(str(tiny_source("tiny-sd3", models_root)), tmp_path / "b", options, progress=False)
    assert not (tmp_path / "b").exists()


def test_controlnets_of_the_other_kind_are_refused(models_root, tmp_path):
    """A UNet's ControlNetModel for SD3, and an SD3ControlNetModel for a UNet: refused, naming the classes."""
    from tiny_models import tiny_controlnet

    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportError

    for arch, net, message in (
        ("tiny-sd3", tiny_controlnet("tiny-sd1", models_root), "a ControlNetModel, not the SD3ControlNetModel"),
        ("tiny-sd1", tiny_sd3_controlnet(models_root, "canny"), "a SD3ControlNetModel, not the ControlNetModel"),
    ):
        options = ExportOptions(controlnets=(f"{net}:net",))
        with pytest.raises(ExportError, match=message):
            write_onnx_bundle(str(tiny_source(arch, models_root)), tmp_path / "b", options, progress=False)
        assert not (tmp_path / "b").exists()
