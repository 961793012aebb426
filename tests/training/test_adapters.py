"""The adapters that ship with the shipped model, through the product (export, `edgediff lora convert`, generate),
judged by the shapes checker; and their training scripts in smoke form."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402

from edgediff.cli.main import cli  # noqa: E402
from edgediff.runtime import Pipeline  # noqa: E402
from training import adapter_eval  # noqa: E402

PROMPTS = 20  # one batch of evaluation prompts (the model card's figures use 200)
STEPS = 4  # the bundle's default
# Floors, under the model card's measured figures on 200 prompts at 4 steps with a margin for 20 prompts:
LORA_COLOUR_FLOOR = 0.8  # shapes read green with the LoRA at weight 1
PROMPT_COLOUR_FLOOR = 0.9  # shapes read in the prompt's colour without it (the plain model: 100%)
BACKGROUND_FLOOR = 0.9  # the LoRA recolours the shape, not the background
CONTROL_FLOOR = 0.8  # shapes read at the left with a left square's edges, prompts saying "at the right"
PROMPT_POSITION_FLOOR = 0.9  # the same prompts without control: at the right (the plain model: 100%)


@pytest.fixture(scope="module")
def lora_pipe(tmp_path_factory):
    bundle = adapter_eval.export_shipped_with(tmp_path_factory.mktemp("lora") / "bundle", lora_slots="transformer")
    file = adapter_eval.shipped_lora_file()
    result = CliRunner().invoke(cli, ["lora", "convert", str(file), "--model", str(bundle), "--name", "green"])
    assert result.exit_code == 0, result.output
    return Pipeline.from_bundle(bundle, provider="cpu")


def test_shipped_lora_draws_every_shape_in_its_colour(lora_pipe):
    scenes = adapter_eval.lora_prompts(PROMPTS, "green")
    assert all("green" not in (s.colour, s.background) for s in scenes)
    r = adapter_eval.measure_lora(lora_pipe, scenes, STEPS)
    assert r["lora_colour_with"] >= LORA_COLOUR_FLOOR, r
    assert r["prompt_colour_without"] >= PROMPT_COLOUR_FLOOR, r
    assert r["background_with"] >= BACKGROUND_FLOOR, r


def test_shipped_lora_switches_off_without_reopening(lora_pipe):
    """Weight 0 and no LoRA give the plain image exactly, after a call with the LoRA on."""
    import numpy as np

    prompt = "a large red circle at the left on a blue background"
    lora_pipe(prompt, seed=0, loras={"green": 1.0})
    plain = lora_pipe(prompt, seed=0, output_type="np").images
    off = lora_pipe(prompt, seed=0, output_type="np", loras={"green": 0.0}).images
    assert np.array_equal(plain, off)


def test_shipped_controlnet_puts_the_shape_where_its_edges_are(tmp_path):
    source = adapter_eval.shipped_controlnet_dir()
    bundle = adapter_eval.export_shipped_with(tmp_path / "bundle", controlnets=((str(source), "canny"),))
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    assert [c["conditioning_type"] for c in pipe.manifest.controlnets] == ["canny"]
    scenes = adapter_eval.control_prompts(PROMPTS, "right")
    image = adapter_eval.control_image("left")
    r = adapter_eval.measure_control(pipe, scenes, STEPS, image, "left")
    assert r["control_position_with"] >= CONTROL_FLOOR, r
    assert r["prompt_position_without"] >= PROMPT_POSITION_FLOOR, r
    silent = adapter_eval.measure_control(pipe, adapter_eval.control_prompts(PROMPTS, None), STEPS, image, "left")
    assert silent["control_position_with"] >= CONTROL_FLOOR, silent


def test_lora_training_runs_resumes_and_writes_a_convertible_file(tmp_path):
    from edgediff.export.lora_convert import lora_layers
    from training.lora import smoke_config, train

    cfg = smoke_config()
    out = train(cfg, tmp_path / "run", tmp_path / "out" / "x.safetensors")
    layers = lora_layers(out, sdxl=False)
    assert layers and all(component == "unet" for component, _ in layers)
    assert all(down.shape[-1] == cfg.rank for down, _ in (v for (_, m), v in layers.items() if "to_q" in m))
    assert "lora eval" in (tmp_path / "run" / "lora.log").read_text()
    assert train(cfg, tmp_path / "run", out) == out  # resumed at its last step: nothing left to do


def test_controlnet_training_runs_and_writes_an_fp16_folder(tmp_path):
    import json

    from training.controlnet import smoke_config, train

    out = train(smoke_config(), tmp_path / "run", tmp_path / "controlnet_canny")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel" and "_name_or_path" not in config
    assert (out / "diffusion_pytorch_model.safetensors").exists()
    assert "eval position" in (tmp_path / "run" / "controlnet.log").read_text()
