"""Measures the shipped adapters through the product: export the shipped model with LoRA slots or the ControlNet,
convert the LoRA with `edgediff lora convert`, generate, and read the images back with the checker.

    python -m training.adapter_eval lora --n 200         # shape colour with the LoRA at weight 1 and without it
    python -m training.adapter_eval controlnet --n 200   # position with a square's edge map at the left and without

Prompts are the evaluation prompts (training/evaluate.py), never used in training. LoRA: those whose shape and
background are not the LoRA's colour (so that a change shows, and a shape of that colour stays visible). ControlNet:
each prompt made to say "at the right" (the control image's opposite) or to name no position.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np

from . import checker
from .evaluate import eval_prompts
from .shapes import Scene, render

LORA_NAME = "green"
CONTROLNET_NAME = "canny"
BATCH = 20


def shipped_lora_file() -> Path:
    from .ship import STUDENT_DIR

    return STUDENT_DIR.parent / "loras" / f"{LORA_NAME}.safetensors"


def shipped_controlnet_dir() -> Path:
    from .ship import STUDENT_DIR

    return STUDENT_DIR.parent / f"controlnet_{CONTROLNET_NAME}"


def lora_prompts(n: int, colour: str) -> list[Scene]:
    """The first n evaluation prompts whose shape and background are not `colour`."""
    scenes = [s for s in eval_prompts(6 * n) if colour not in (s.colour, s.background)]
    return scenes[:n]


def control_prompts(n: int, says: str | None) -> list[Scene]:
    """The first n evaluation prompts, each made to say "at the <says>" (None: to name no position)."""
    return [dataclasses.replace(s, position=says or s.position, say_position=says is not None) for s in eval_prompts(n)]


def control_image(position: str = "left", shape: str = "square", size: str = "large"):
    """Canny edges (the runtime's, default thresholds) of a white shape on black at `position`."""
    from edgediff.runtime.preprocess import canny_image

    return canny_image(render(Scene("white", shape, "black", size, position), np.random.default_rng(0)))


def export_shipped_with(out: Path, **options) -> Path:
    """The shipped student exported with the bundle's defaults and extra ExportOptions (lora_slots, controlnets)."""
    from edgediff.export import ExportOptions, export

    from .ship import DEFAULT_STEPS, STUDENT_DIR
    from .shipped_config import ShippedConfig

    opts = ExportOptions(
        default_steps=DEFAULT_STEPS, default_guidance=ShippedConfig().default_guidance, overwrite=True, **options
    )
    return export(str(STUDENT_DIR), out, opts, progress=False)


def generate(pipe, scenes: list[Scene], steps: int, **kwargs) -> list:
    images = []
    for start in range(0, len(scenes), BATCH):
        chunk = [s.caption for s in scenes[start : start + BATCH]]
        images += pipe(chunk, num_inference_steps=steps, seed=start, **kwargs).images
    return images


def rate(images, attribute: str, wanted) -> float:
    """The share of images the checker reads `attribute` (colour, position, ...) as `wanted` (one value, or one
    per image)."""
    wanted = wanted if isinstance(wanted, list) else [wanted] * len(images)
    return float(np.mean([getattr(checker.read(im), attribute) == w for im, w in zip(images, wanted)]))


def measure_lora(pipe, scenes: list[Scene], steps: int, name: str = LORA_NAME, colour: str = "green") -> dict:
    with_lora = generate(pipe, scenes, steps, loras={name: 1.0})
    without = generate(pipe, scenes, steps)
    return {
        "lora_colour_with": rate(with_lora, "colour", colour),
        "prompt_colour_with": rate(with_lora, "colour", [s.colour for s in scenes]),
        "prompt_colour_without": rate(without, "colour", [s.colour for s in scenes]),
        "lora_colour_without": rate(without, "colour", colour),
        "background_with": rate(with_lora, "background", [s.background for s in scenes]),
        "shape_with": rate(with_lora, "shape", [s.shape for s in scenes]),
        "shape_without": rate(without, "shape", [s.shape for s in scenes]),
    }


def measure_control(pipe, scenes: list[Scene], steps: int, image, at: str = "left") -> dict:
    with_control = generate(pipe, scenes, steps, control_image=image)
    without = generate(pipe, scenes, steps)
    result = {
        "control_position_with": rate(with_control, "position", at),
        "control_position_without": rate(without, "position", at),
        "colour_with": rate(with_control, "colour", [s.colour for s in scenes]),
        "shape_with": rate(with_control, "shape", [s.shape for s in scenes]),
    }
    if all(s.say_position for s in scenes):
        result["prompt_position_with"] = rate(with_control, "position", [s.position for s in scenes])
        result["prompt_position_without"] = rate(without, "position", [s.position for s in scenes])
    return result


def _lora(args) -> None:
    from edgediff.export.lora_convert import convert_lora
    from edgediff.runtime import Pipeline

    bundle = export_shipped_with(args.work / "bundle-lora-slots", lora_slots="transformer")
    convert_lora(shipped_lora_file(), bundle, LORA_NAME, overwrite=True)
    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=args.threads)
    scenes = lora_prompts(args.n, "green")
    print(f"{len(scenes)} prompts, shape and background not green")
    print(
        "| steps | green with the LoRA | prompt's colour with / without | green without | background with | shape with / without |"
    )
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        r = measure_lora(pipe, scenes, steps)
        print(
            f"| {steps} | {r['lora_colour_with']:.1%} | {r['prompt_colour_with']:.1%} / {r['prompt_colour_without']:.1%} "
            f"| {r['lora_colour_without']:.1%} | {r['background_with']:.1%} | {r['shape_with']:.1%} / {r['shape_without']:.1%} |",
            flush=True,
        )


def _controlnet(args) -> None:
    from edgediff.runtime import Pipeline

    bundle = export_shipped_with(
        args.work / "bundle-controlnet", controlnets=((str(shipped_controlnet_dir()), CONTROLNET_NAME),)
    )
    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=args.threads)
    print(
        "| prompt says | control | steps | read at the control's place, with / without | prompt's place, with / without | colour with | shape with |"
    )
    print("|---|---|---|---|---|---|---|")
    for says, at in (("right", "left"), (None, "left"), ("left", "right"), ("bottom", "top")):
        scenes = control_prompts(args.n, says)
        image = control_image(at)
        for steps in args.steps:
            r = measure_control(pipe, scenes, steps, image, at)
            prompt = f"{r['prompt_position_with']:.1%} / {r['prompt_position_without']:.1%}" if says else "-"
            print(
                f"| {says or '(no position)'} | square at the {at} | {steps} | {r['control_position_with']:.1%} / "
                f"{r['control_position_without']:.1%} | {prompt} | {r['colour_with']:.1%} | {r['shape_with']:.1%} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", choices=("lora", "controlnet"))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    parser.add_argument("--work", type=Path, default=Path("runs/adapter-eval"), help="where the bundles are exported")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    (_lora if args.adapter == "lora" else _controlnet)(args)


if __name__ == "__main__":
    main()
