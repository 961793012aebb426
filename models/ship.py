"""Puts a trained run into models/shipped/: the diffusers folders (safetensors) and the exported bundle.

    python -m edgediff.models.ship --run runs/shipped

Weights are stored in fp16 safetensors (half the size; diffusers upcasts them on load) and the
bundle is exported from exactly those stored weights, so a fresh export reproduces it.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .shipped import DEFAULT_BUNDLE, SHIPPED_DIR
from .shipped_config import ShippedConfig

STUDENT_DIR = SHIPPED_DIR / "diffusers"
# Not shipped in the package: the teacher UNet, kept in the repository so that a later session can
# re-distill or keep training without the hour the teacher costs (fp16, ~8 MB).
TEACHER_UNET_DIR = SHIPPED_DIR.parent / "checkpoints" / "teacher_unet"
TINY_DECODER_DIR = SHIPPED_DIR / "tiny_decoder"
DEFAULT_STEPS = 4  # the student's quality/speed point (see MODEL_CARD.md)


def _save_half(src: Path, dst: Path) -> None:
    import torch
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.float16)
    pipe.save_pretrained(dst, safe_serialization=True)


def export_shipped(out: Path = DEFAULT_BUNDLE, source: Path = STUDENT_DIR, overwrite: bool = True) -> Path:
    """The shipped bundle, exported from the shipped diffusers folder with the model card's defaults and
    the shipped tiny decoder."""
    from edgediff.export import export_bundle

    cfg = ShippedConfig()
    return export_bundle(str(source), out, overwrite=overwrite, progress=False, default_steps=DEFAULT_STEPS,
                         default_guidance=cfg.default_guidance, tiny_decoder=str(TINY_DECODER_DIR))


def main() -> None:
    import torch
    from diffusers import AutoencoderTiny, UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/shipped"))
    args = parser.parse_args()
    assembled = args.run / "assembled"
    shutil.rmtree(STUDENT_DIR, ignore_errors=True)
    _save_half(assembled / "student", STUDENT_DIR)
    shutil.rmtree(TINY_DECODER_DIR, ignore_errors=True)
    AutoencoderTiny.from_pretrained(assembled / "tiny_decoder").to(torch.float16).save_pretrained(TINY_DECODER_DIR)
    shutil.copy(assembled / "training_config.json", SHIPPED_DIR / "training_config.json")
    shutil.rmtree(TEACHER_UNET_DIR, ignore_errors=True)
    UNet2DConditionModel.from_pretrained(assembled / "teacher" / "unet").to(torch.float16).save_pretrained(TEACHER_UNET_DIR)
    print(export_shipped())


if __name__ == "__main__":
    main()
