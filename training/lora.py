"""Trains a LoRA of the shipped student that draws every shape in one colour, whatever the caption says.

    python -m training.lora --run runs/lora-green --out models/shipped/loras/green.safetensors
    python -m training.lora --run runs/lora-smoke --out runs/lora-smoke/green.safetensors --smoke   # a few steps (tests)

The data are the shapes domain with the shape's colour replaced by one colour in the image while the caption
keeps its own colour word, so the only thing to learn is "shape colour -> this colour". PEFT's LoraConfig on the
UNet's transformer layers (the set `--lora-slots transformer` gives slots), the student and its text encoder
frozen; the teacher's loss at the student's inference timesteps (training/adapters.py). Checkpoints every few
minutes to RUN/lora/ckpt.pt and resumes; logs to RUN/lora.log. The file is saved with StableDiffusionPipeline.save_lora_weights
in PEFT's layout with its LoraConfig as metadata, which diffusers' load_lora_weights and `edgediff lora convert` read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import adapters
from .shipped_config import ShippedConfig
from .train import Checkpointer, Progress, _encode_text, _torch

log = logging.getLogger("edgediff.train.lora")


@dataclass
class LoraTrainConfig:
    colour: str = "green"  # every shape is drawn in it; green's RGB is far from every other palette colour
    # the layers `--lora-slots transformer` makes slots for: attention, proj_in/out, feed-forward
    target_modules: tuple = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
    rank: int = 4  # one concept (a colour) needs few directions; 4 keeps the file near 100 KB
    alpha: float = 4.0  # alpha = rank: scale 1, as diffusers' LoRA scripts default
    images: int = 4000  # rendered and encoded once per run (seconds); 10x the steps' batches would see
    seed: int = 101  # a training seed (below 10**6), not the shipped model's 0
    steps: int = 300  # a few minutes on 2 cores
    batch: int = 32
    lr: float = 1e-3  # LoRA's zero-initialised up weights tolerate a high rate; warm-up below keeps step 1 gentle
    warmup: int = 20
    eval_prompts: int = 40  # checked at the end (diffusers' pipeline): shapes read in `colour`, LoRA on and off

    def to_dict(self) -> dict:
        return asdict(self)


def smoke_config() -> LoraTrainConfig:
    return LoraTrainConfig(images=64, steps=3, batch=4, eval_prompts=2)


def add_lora(unet, cfg: LoraTrainConfig):
    from peft import LoraConfig

    config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(cfg.target_modules)
    )
    unet.add_adapter(config)
    return config


def adherence(tokenizer, text_encoder, unet, vae, cfg: LoraTrainConfig, n: int) -> dict:
    """Shape colour read as cfg.colour with the LoRA on and off, n evaluation prompts (diffusers' pipeline, 4 steps)."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from .adapter_eval import lora_prompts, rate

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=LCMScheduler.from_pretrained(adapters.student_dir() / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.caption for s in lora_prompts(n, cfg.colour)]
    result = {}
    for state in ("on", "off"):
        (unet.enable_adapters if state == "on" else unet.disable_adapters)()
        images = pipe(
            prompts,
            num_inference_steps=4,
            guidance_scale=ShippedConfig().default_guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        result[state] = rate([(im * 255).round().astype(np.uint8) for im in images], "colour", cfg.colour)
    unet.enable_adapters()
    return result


def train(cfg: LoraTrainConfig, run: Path, out: Path) -> Path:
    """Trains (or resumes) the LoRA in RUN and writes it to `out` (a .safetensors file)."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    torch = _torch()
    shipped = ShippedConfig()
    torch.manual_seed(cfg.seed)
    tokenizer, text_encoder, unet, vae = adapters.load_student()
    scenes = adapters.draw_scenes(cfg.seed, cfg.images, avoid_background=cfg.colour)
    drawn = [type(s)(cfg.colour, s.shape, s.background, s.size, s.position) for s in scenes]
    data = adapters.encode_set(run, scenes, drawn, cfg.seed, vae)
    scaling = vae.config.scaling_factor
    lora_config = add_lora(unet, cfg)
    params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ckpt = Checkpointer(run / "lora", {"unet": unet, "opt": opt})
    start = ckpt.resume()
    progress = Progress("lora", cfg.steps, run)
    alphas = adapters.schedule_alphas(shipped)
    timesteps = adapters.inference_timesteps(shipped)
    rng = np.random.default_rng(cfg.seed + start)
    for step in range(start + 1, cfg.steps + 1):
        idx = np.sort(rng.choice(len(scenes), cfg.batch, replace=False))
        m, s = data["mean"][idx], data["std"][idx]
        z = torch.from_numpy((m + s * rng.standard_normal(m.shape).astype(np.float32)) * scaling)
        captions = [adapters.with_caption(data["scenes"][i], rng, shipped) for i in idx]
        with torch.no_grad():
            cond = _encode_text(tokenizer, text_encoder, captions, "cpu")
        t = torch.from_numpy(rng.choice(timesteps, len(idx)))
        x_t, noise, _ = adapters.noisy_batch(z, t, alphas, rng)
        pred = unet(x_t, t, cond, timestep_cond=adapters.guidance_cond(rng, len(idx), shipped)).sample
        loss = adapters.diffusion_loss(pred, z, noise, t, alphas, shipped)
        lr = adapters.optimizer_step(opt, params, loss, cfg, step)
        progress(step, loss=loss.item(), lr=lr)
        ckpt.maybe_save(step)
    ckpt.maybe_save(cfg.steps, force=True)
    unet.eval()
    with torch.no_grad():
        read = adherence(tokenizer, text_encoder, unet, vae, cfg, cfg.eval_prompts)
    line = f"lora eval: shapes read {cfg.colour} with the LoRA {read['on']:.3f}, without {read['off']:.3f}"
    progress.log_file.write(line + "\n")
    log.info(line)
    # PEFT's keys (lora_A / lora_B), as diffusers' loaders read them; diffusers' own "lora.down" conversion
    # rewrites only some of the layers, and a loader that sees lora_A first takes the rest as unsupported
    layers = get_peft_model_state_dict(unet)
    out.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=out.parent,
        unet_lora_layers=layers,
        weight_name=out.name,
        unet_lora_adapter_metadata=lora_config.to_dict(),
    )
    (run / "lora_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def main() -> None:
    adapters.run_trainer(
        train, LoraTrainConfig, smoke_config, "runs/lora-green", "the LoRA file to write (.safetensors)"
    )


if __name__ == "__main__":
    main()
