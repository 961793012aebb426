"""ControlNet bundles: tiny random ControlNets (ControlNetModel.from_unet with random zero convolutions) exported as
graphs of their own, against diffusers' StableDiffusionControlNetPipeline and StableDiffusionXLControlNetPipeline
(one ControlNet and two, scales, guidance start and end) from the same latents; and the bad inputs."""

import importlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from PIL import Image, ImageDraw  # noqa: E402
from references import PIXEL_ATOL, PROMPTS, controlnet_arguments, text_to_image_reference  # noqa: E402
from replay_noise import patch_diffusers_noise  # noqa: E402
from tiny_models import tiny_controlnet, tiny_controlnet_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline  # noqa: E402
from edgediff.runtime.preprocess import canny_image  # noqa: E402

STEPS = 4
SAMPLER = "euler"
_CONTROLNET_MODULES = {
    False: ("StableDiffusionControlNetPipeline", "diffusers.pipelines.controlnet.pipeline_controlnet"),
    True: ("StableDiffusionXLControlNetPipeline", "diffusers.pipelines.controlnet.pipeline_controlnet_sd_xl"),
}


def _shapes_picture(width: int, height: int) -> Image.Image:
    """A square at the left and a disc at the right: the picture the canny control image is drawn from."""
    picture = Image.new("RGB", (width, height), (20, 30, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle([width // 8, height // 4, width // 2, 3 * height // 4], fill=(230, 40, 40))
    draw.ellipse([5 * width // 8, height // 3, 7 * width // 8, 2 * height // 3], fill=(250, 250, 250))
    return picture


def _depth_picture(width: int, height: int) -> Image.Image:
    """A left-to-right ramp with a bright blob: a stand-in for a user-supplied depth map."""
    ramp = np.tile(np.linspace(0, 255, width, dtype=np.float32), (height, 1))
    yy, xx = np.mgrid[:height, :width]
    blob = 120 * np.exp(-((xx - width / 2) ** 2 + (yy - height / 3) ** 2) / (width * height / 20))
    grey = np.clip(ramp * 0.6 + blob, 0, 255).astype(np.uint8)
    return Image.fromarray(grey).convert("RGB")


# control images at another size than the output's (80 x 72 for 64 x 64): both pipelines resize them (Lanczos)
CONTROL_IMAGES = {"canny": canny_image(_shapes_picture(80, 72)), "depth": _depth_picture(80, 72)}


def _diffusers_images(arch, root, manifest, names, scales, starts, ends, latents, guidance, monkeypatch):
    from diffusers import ControlNetModel, EulerDiscreteScheduler

    sdxl = "text_encoder_2" in manifest.components
    class_name, module_name = _CONTROLNET_MODULES[sdxl]
    seeds = {"canny": 0, "depth": 1}
    nets = [ControlNetModel.from_pretrained(tiny_controlnet(arch, root, seeds[n])) for n in names]
    extra = {"add_watermarker": False} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    controlnet = nets[0] if len(nets) == 1 else nets  # a list: MultiControlNetModel
    pipe = getattr(diffusers, class_name).from_pretrained(str(tiny_source(arch, root)), controlnet=controlnet, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(manifest.scheduler["config"])
    patch_diffusers_noise(monkeypatch, importlib.import_module(module_name), [])
    images = [CONTROL_IMAGES[n] for n in names]
    return pipe(
        PROMPTS,
        **controlnet_arguments(images, scales, starts, ends, image_argument="image"),
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=torch.from_numpy(latents),
        height=manifest.defaults["height"],
        width=manifest.defaults["width"],
        output_type="np",
    ).images


def _latents(manifest, seed=0):
    shape = (
        len(PROMPTS),
        manifest.latent_channels,
        manifest.defaults["height"] // manifest.vae_scale_factor,
        manifest.defaults["width"] // manifest.vae_scale_factor,
    )
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


CASES = [
    # arch, ControlNets used, their scales, guidance starts and ends, CFG guidance
    ("tiny-sd1", ["canny"], [0.8], [0.0], [1.0], 5.0),
    ("tiny-sd1", ["canny", "depth"], [1.0, 0.6], [0.0, 0.25], [0.75, 1.0], 5.0),
    ("tiny-sdxl", ["depth"], [1.0], [0.25], [0.75], 5.0),
    ("tiny-sdxl", ["canny", "depth"], [0.7, 1.2], [0.0, 0.0], [1.0, 0.5], 1.0),  # no CFG
]


@pytest.mark.parametrize(
    "arch,names,scales,starts,ends,guidance", CASES, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in CASES]
)
def test_controlnet_matches_diffusers(models_root, monkeypatch, arch, names, scales, starts, ends, guidance):
    pipe = Pipeline.from_bundle(tiny_controlnet_bundle(arch, models_root), provider="cpu", sampler=SAMPLER)
    m = pipe.manifest
    latents = _latents(m)
    single = len(names) == 1
    # one ControlNet by name (a dict); two as lists in the manifest's order, as diffusers' MultiControlNetModel
    ours = pipe(
        PROMPTS,
        control_image={names[0]: CONTROL_IMAGES[names[0]]} if single else [CONTROL_IMAGES[n] for n in names],
        controlnet_conditioning_scale=scales[0] if single else scales,
        control_guidance_start=starts[0] if single else starts,
        control_guidance_end=ends[0] if single else ends,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        latents=latents,
        output_type="np",
    ).images
    theirs = _diffusers_images(arch, models_root, m, names, scales, starts, ends, latents, guidance, monkeypatch)
    plain = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, latents=latents, output_type="np").images
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - plain).max() > 10 * PIXEL_ATOL  # the control changes the image


def test_without_control_matches_the_plain_pipeline(models_root, monkeypatch):
    """A bundle with ControlNets, called without control_image, is diffusers' plain StableDiffusionPipeline (the UNet
    gets zero residuals)."""
    pipe = Pipeline.from_bundle(tiny_controlnet_bundle("tiny-sd1", models_root), provider="cpu", sampler=SAMPLER)
    latents = _latents(pipe.manifest, seed=3)
    ours = pipe(PROMPTS, num_inference_steps=3, guidance_scale=5.0, latents=latents, output_type="np").images
    theirs = text_to_image_reference(
        tiny_source("tiny-sd1", models_root), SAMPLER, pipe.manifest, PROMPTS, 3, 5.0, latents, monkeypatch, []
    )
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert "controlnet" not in pipe(PROMPTS[0], num_inference_steps=1, seed=0).timings  # no ControlNet ran


def test_manifest_lists_the_controlnets(models_root):
    m = Bundle.open(tiny_controlnet_bundle("tiny-sd1", models_root)).manifest
    assert [(c["name"], c["component"], c["conditioning_type"], c["conditioning_channels"]) for c in m.controlnets] == [
        ("canny", "controlnet_canny", "canny", 3),
        ("depth", "controlnet_depth", "depth", 3),
    ]
    residuals = m.components["unet"].attributes["controlnet_residuals"]
    unet_inputs = {t.name for t in m.components["unet"].inputs}
    assert {r["name"] for r in residuals} <= unet_inputs
    outputs = [t.name for t in m.components["controlnet_canny"].outputs]
    assert len(outputs) == len(residuals)
    checks = m.provenance["export_check"]["max_rel_diff"]
    assert set(checks["controlnet_canny"]) == set(outputs)  # checked against PyTorch like every graph


def test_controlnet_timings_and_guidance_window(models_root):
    pipe = Pipeline.from_bundle(tiny_controlnet_bundle("tiny-sd1", models_root), provider="cpu")
    out = pipe(
        PROMPTS[0],
        control_image={"canny": CONTROL_IMAGES["canny"]},
        control_guidance_end=0.5,
        num_inference_steps=4,
        guidance_scale=1.0,
        seed=0,
    )
    assert len(out.timings["controlnet"]) == 2  # steps 0 and 1 of 4: the window [0, 0.5]


# --- bad input ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def control_pipe(models_root):
    return Pipeline.from_bundle(tiny_controlnet_bundle("tiny-sd1", models_root), provider="cpu")


def test_unknown_controlnet_lists_the_known_ones(control_pipe):
    with pytest.raises(InputError, match=r"unknown ControlNet 'pose'; this bundle has: canny, depth"):
        control_pipe("a", control_image={"pose": CONTROL_IMAGES["canny"]}, num_inference_steps=1)
    with pytest.raises(InputError, match="unknown ControlNet 'pose'"):
        control_pipe("a", control_image=[CONTROL_IMAGES["canny"]] * 2, controlnet_conditioning_scale={"pose": 1})


def test_ambiguous_or_miscounted_control_images(control_pipe):
    with pytest.raises(InputError, match=r"2 ControlNets \(canny, depth\)"):
        control_pipe("a", control_image=CONTROL_IMAGES["canny"], num_inference_steps=1)
    with pytest.raises(InputError, match="control_image has 1 entries for 2 ControlNets"):
        control_pipe("a", control_image=[CONTROL_IMAGES["canny"]], num_inference_steps=1)
    with pytest.raises(InputError, match="control_guidance_start must be >= 0"):
        control_pipe(
            "a", control_image=[CONTROL_IMAGES["canny"]] * 2, control_guidance_start=0.6, control_guidance_end=0.4
        )


def test_control_image_of_any_size_is_resized(control_pipe):
    small = canny_image(_shapes_picture(24, 40))
    out = control_pipe("a", control_image={"canny": small}, num_inference_steps=1, seed=0, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)


def test_bundle_without_controlnets_refuses_control_image(models_root):
    from tiny_models import tiny_bundle

    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    with pytest.raises(InputError, match="has no ControlNet.*--controlnet"):
        pipe("a", control_image=CONTROL_IMAGES["canny"], num_inference_steps=1)


def test_controlnet_for_another_unet_is_refused(models_root, tmp_path):
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportError

    options = ExportOptions(controlnets=(f"{tiny_controlnet('tiny-sdxl', models_root)}:xl",))
    with pytest.raises(ExportError, match="ControlNet does not fit"):
        write_onnx_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "b", options, progress=False)
    assert not (tmp_path / "b").exists()


# --- options and CLI -------------------------------------------------------------------------------------------


def test_controlnet_option_names():
    from edgediff.export.controlnet import parse_controlnet
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportOptionsError

    assert parse_controlnet("lllyasviel/sd-controlnet-canny") == ("lllyasviel/sd-controlnet-canny", "canny")
    assert parse_controlnet("thibaud/controlnet-openpose-sdxl-1.0") == ("thibaud/controlnet-openpose-sdxl-1.0", "pose")
    assert parse_controlnet("./nets/my-net:edges") == ("./nets/my-net", "edges")
    assert parse_controlnet("C:\\nets\\cn") == ("C:\\nets\\cn", "cn")  # a drive's colon is not a name
    options = ExportOptions(controlnets=("a/b-depth", ("x/y", "mine")))
    assert options.controlnets == (("a/b-depth", "depth"), ("x/y", "mine"))
    with pytest.raises(ExportOptionsError, match="int8-static"):
        ExportOptions(controlnets=("a/b-depth",), precision="int8-static")
    with pytest.raises(ExportOptionsError, match="apply to --target onnx"):
        ExportOptions(controlnets=("a/b-depth",), target="coreml")


def test_cli_control_and_canny(models_root, tmp_path):
    from click.testing import CliRunner

    from edgediff.cli.main import cli

    bundle = str(tiny_controlnet_bundle("tiny-sd1", models_root))
    _shapes_picture(64, 64).save(tmp_path / "shapes.png")
    runner = CliRunner()
    result = runner.invoke(cli, ["canny", str(tmp_path / "shapes.png"), str(tmp_path / "edges.png")])
    assert result.exit_code == 0, result.output
    base = ["generate", "a", "--model", bundle, "--steps", "1", "--seed", "0"]
    for name, control in (("a.png", []), ("b.png", ["--control", f"canny={tmp_path / 'edges.png'}:0.9"])):
        result = runner.invoke(cli, [*base, *control, "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "a.png").tobytes() != Image.open(tmp_path / "b.png").tobytes()
    result = runner.invoke(cli, [*base, "--control", f"pose={tmp_path / 'edges.png'}", "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "unknown ControlNet 'pose'; this bundle has: canny, depth" in result.output
    result = runner.invoke(cli, [*base, "--control", "canny", "-o", str(tmp_path / "c.png")])
    assert result.exit_code == 1 and "--control takes NAME=IMAGE[:SCALE]" in result.output
