"""What the adapter trainers (training/lora.py, training/controlnet.py) share: the shipped student's parts, the
training set rendered and encoded once per run, the timesteps the student is sampled at, and the loss.

Both adapters train on the shipped student itself (models/shipped/diffusers), frozen, with the teacher's
objective: v-prediction MSE under Min-SNR weighting (train._target, train._loss_weight) on the student's own
noise schedule, at the timesteps the bundle's 1-, 2- and 4-step schedules visit, with the LCM guidance w given to
the student as it is at inference.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .shapes import Scene, random_scene, render
from .shipped_config import ShippedConfig
from .train import _alphas, _guidance_embedding, _loss_weight, _target, _torch

INFERENCE_STEPS = (1, 2, 4)  # the step counts the model card evaluates; their timesteps are the ones trained
ENCODE_BATCH = 256


def student_dir() -> Path:
    from .ship import STUDENT_DIR

    return STUDENT_DIR


def load_student():
    """(tokenizer, text encoder, UNet, VAE) of the shipped student in fp32, frozen and in eval mode."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = student_dir()
    tokenizer = CLIPTokenizer.from_pretrained(src / "tokenizer")
    parts = (
        CLIPTextModel.from_pretrained(src / "text_encoder", dtype=torch.float32),
        UNet2DConditionModel.from_pretrained(src / "unet", torch_dtype=torch.float32),
        AutoencoderKL.from_pretrained(src / "vae", torch_dtype=torch.float32),
    )
    for part in parts:
        part.eval().requires_grad_(False)
    return (tokenizer, *parts)


def inference_timesteps(cfg: ShippedConfig, steps=INFERENCE_STEPS) -> np.ndarray:
    """The distinct timesteps the runtime's LCM sampler visits for each of `steps` (999, 759, 499, 259)."""
    from edgediff.runtime.schedulers.schedule import ScheduleConfig, discrete_distilled_timesteps

    config = ScheduleConfig.from_dict(cfg.scheduler)
    return np.unique(np.concatenate([discrete_distilled_timesteps(config, n) for n in steps])).astype(np.int64)


def render_scenes(scenes: list[Scene], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(render(s, rng)) for s in scenes])


def draw_scenes(seed: int, n: int, avoid_background: str | None = None) -> list[Scene]:
    """n scenes with every attribute named (captions choose later what they say); `avoid_background` is a colour
    the background never takes (a shape of that colour must stay visible)."""
    rng = np.random.default_rng(seed)
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng, p_omit=0.0)
        if s.background != avoid_background:
            scenes.append(s)
    return scenes


def encode_set(run: Path, scenes: list[Scene], drawn: list[Scene], seed: int, vae) -> dict:
    """Renders `drawn` (what the images show), encodes them with the shipped VAE, and caches images, latent
    posteriors and `scenes` (what the captions are built from) in RUN/data.npz; a later call reads the cache."""
    torch = _torch()
    path = run / "data.npz"
    if not path.exists():
        images = render_scenes(drawn, seed)
        means, stds = [], []
        with torch.no_grad():
            for i in range(0, len(images), ENCODE_BATCH):
                x = torch.from_numpy(images[i : i + ENCODE_BATCH]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
                dist = vae.encode(x).latent_dist
                means.append(dist.mean.numpy())
                stds.append(dist.std.numpy())
        run.mkdir(parents=True, exist_ok=True)
        rows = [[s.colour, s.shape, s.background, s.size, s.position] for s in scenes]
        (run / "scenes.json").write_text(json.dumps(rows))
        partial = run / "data.partial.npz"
        np.savez(partial, images=images, mean=np.concatenate(means), std=np.concatenate(stds))
        partial.replace(path)  # the cache is whole or absent
    data = np.load(path)
    return {
        "images": data["images"],
        "mean": data["mean"],
        "std": data["std"],
        "scenes": [Scene(*row) for row in json.loads((run / "scenes.json").read_text())],
    }


def noisy_batch(z, t, alphas, rng):
    """(x_t, noise, alpha) for latents z at timesteps t, noise from the numpy generator (resumable runs)."""
    torch = _torch()
    noise = torch.from_numpy(rng.standard_normal(tuple(z.shape)).astype(np.float32))
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z + (1 - a).sqrt() * noise, noise, a


def guidance_cond(rng, n: int, cfg: ShippedConfig):
    """The student's LCM guidance embedding for w drawn over the range it was distilled on."""
    torch = _torch()
    w = torch.from_numpy(rng.uniform(*cfg.guidance_range, n).astype(np.float32))
    return _guidance_embedding(w, cfg.guidance_embedding_dim)


def diffusion_loss(pred, z, noise, t, alphas, cfg: ShippedConfig):
    """The teacher's loss: Min-SNR weighted MSE against the v (or eps) target."""
    a = alphas[t].view(-1, 1, 1, 1)
    per_image = ((pred - _target(z, noise, a, cfg)) ** 2).mean(dim=(1, 2, 3))
    return (_loss_weight(alphas[t], cfg) * per_image).mean()


def schedule_alphas(cfg: ShippedConfig):
    return _alphas(cfg)


def with_caption(scene: Scene, rng, cfg: ShippedConfig) -> str:
    """The scene's caption, naming size and position as often as the shipped model's captions did."""
    return replace(
        scene, say_size=bool(rng.random() >= cfg.caption_omit), say_position=bool(rng.random() >= cfg.caption_omit)
    ).caption


def optimizer_step(opt, params, loss, cfg, step: int) -> float:
    """One step of an adapter trainer: warm-up then cosine decay of cfg.lr (over cfg.warmup and cfg.steps),
    gradients clipped to norm 1; returns the learning rate used."""
    import math

    torch = _torch()
    lr = cfg.lr * min(1.0, step / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return lr


def run_trainer(train, config, smoke_config, default_run: str, out_help: str) -> None:
    """The command line both adapter trainers share: --run, --out, --smoke, --threads."""
    import argparse
    import logging
    import sys
    import time

    parser = argparse.ArgumentParser(description=(sys.modules[train.__module__].__doc__ or "").splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path(default_run), help="data cache, checkpoint, log")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    parser.add_argument("--smoke", action="store_true", help="a few steps (for tests)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        _torch().set_num_threads(args.threads)
    t0 = time.time()
    out = train(smoke_config() if args.smoke else config(), args.run, args.out)
    logging.getLogger("edgediff.training").info("wrote %s in %.0f s", out, time.time() - t0)
