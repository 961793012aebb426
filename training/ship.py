"""Puts a trained run into its shipped model's folder: the diffusers folders (safetensors) and the exported bundle.

    python -m training.ship --run runs/shipped                              # models/shipped/
    python -m training.ship --model shapes-flow --run runs/shipped-flow     # models/shapes_flow/

Weights are stored in fp16 safetensors (half the size; diffusers upcasts them on load) and the
bundle is exported from exactly those stored weights, so a fresh export reproduces it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from edgediff.models.shipped import DEFAULT_BUNDLE, SHIPPED_DIR, SHIPPED_MODELS

from .flow_config import FlowConfig
from .shipped_config import ShippedConfig

STUDENT_DIR = SHIPPED_DIR / "diffusers"
# Not shipped in the package: the teacher UNet, kept in the repository so that a later run can
# re-distill or keep training without the hour the teacher costs.
TEACHER_UNET_DIR = Path(__file__).parent / "checkpoints" / "teacher_unet"
TINY_DECODER_DIR = SHIPPED_DIR / "tiny_decoder"
DEFAULT_STEPS = 4  # the student's quality/speed point (see MODEL_CARD.md)

FLOW = SHIPPED_MODELS["shapes-flow"]
# Not shipped either: the flow teacher's transformer (its text encoders are the student's), for re-distillation.
FLOW_TEACHER_DIR = Path(__file__).parent / "checkpoints" / "flow_teacher_transformer"
FLOW_DEFAULT_STEPS = FlowConfig().default_steps  # the student's quality/speed point (MODEL_CARD_SHAPES_FLOW.md)


def strip_local_paths(folder: Path) -> None:
    """Drops `_name_or_path` from every config under `folder`: diffusers records the folder a model was
    loaded from, a path on the machine that saved it that means nothing anywhere else."""
    for path in folder.rglob("*.json"):
        config = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(config, dict) and "_name_or_path" in config:
            del config["_name_or_path"]
            # as diffusers writes its configs, so that the files differ only by the dropped key
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_half(src: Path, dst: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float16)
    pipe.save_pretrained(dst, safe_serialization=True)
    strip_local_paths(dst)


def export_shipped(out: Path = DEFAULT_BUNDLE, source: Path = STUDENT_DIR, overwrite: bool = True) -> Path:
    """The shipped bundle, exported from the shipped diffusers folder with the model card's defaults and
    the shipped tiny decoder."""
    from edgediff.export import ExportOptions, export

    options = ExportOptions(
        overwrite=overwrite,
        default_steps=DEFAULT_STEPS,
        default_guidance=ShippedConfig().default_guidance,
        tiny_decoder=str(TINY_DECODER_DIR),
    )
    return export(str(source), out, options, progress=False)


def export_shapes_flow(out: Path = FLOW.bundle, source: Path = FLOW.diffusers, overwrite: bool = True) -> Path:
    """The shapes-flow bundle, exported from its shipped diffusers folder: its default steps without guidance (the
    student has the teacher's guidance baked in), and the first model's tiny decoder, which reads the same
    VAE's latents."""
    from edgediff.export import ExportOptions, export

    options = ExportOptions(
        overwrite=overwrite,
        default_steps=FLOW_DEFAULT_STEPS,
        default_guidance=0.0,
        tiny_decoder=str(TINY_DECODER_DIR),
    )
    return export(str(source), out, options, progress=False)


def ship_shapes_flow(run: Path) -> Path:
    import torch
    from diffusers import SD3Transformer2DModel

    assembled = run / "assembled"
    shutil.rmtree(FLOW.diffusers, ignore_errors=True)
    _save_half(assembled / "student", FLOW.diffusers)
    shutil.copy(assembled / "training_config.json", FLOW.folder / "training_config.json")
    shutil.rmtree(FLOW_TEACHER_DIR, ignore_errors=True)
    teacher = SD3Transformer2DModel.from_pretrained(assembled / "teacher" / "transformer")
    teacher.to(torch.float16).save_pretrained(FLOW_TEACHER_DIR)
    strip_local_paths(FLOW_TEACHER_DIR)
    return export_shapes_flow()


def main() -> None:
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=tuple(SHIPPED_MODELS), default="shipped")
    parser.add_argument("--run", type=Path, default=None, help="the training run (default: runs/shipped)")
    args = parser.parse_args()
    if args.model == FLOW.name:
        print(ship_shapes_flow(args.run or Path("runs/shipped-flow")))
        return
    assembled = (args.run or Path("runs/shipped")) / "assembled"
    shutil.rmtree(STUDENT_DIR, ignore_errors=True)
    _save_half(assembled / "student", STUDENT_DIR)
    shutil.rmtree(TINY_DECODER_DIR, ignore_errors=True)
    AutoencoderTiny.from_pretrained(assembled / "tiny_decoder").to(torch.float16).save_pretrained(TINY_DECODER_DIR)
    strip_local_paths(TINY_DECODER_DIR)
    shutil.copy(assembled / "training_config.json", SHIPPED_DIR / "training_config.json")
    shutil.rmtree(TEACHER_UNET_DIR, ignore_errors=True)
    UNet2DConditionModel.from_pretrained(assembled / "teacher" / "unet").to(torch.float16).save_pretrained(
        TEACHER_UNET_DIR
    )
    strip_local_paths(TEACHER_UNET_DIR)
    print(export_shipped())


if __name__ == "__main__":
    main()
