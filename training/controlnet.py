"""Trains a canny ControlNet for the shipped student: an edge map decides where the shape goes.

    python -m training.controlnet --run runs/controlnet-canny --out models/shipped/controlnet_canny
    python -m training.controlnet --run runs/cn-smoke --out runs/cn-smoke/controlnet --smoke    # a few steps (tests)

ControlNetModel.from_unet on the shipped student (its down path and mid-block copied, zero convolutions out), the
student and its text encoder frozen. Conditioning: Canny edges (runtime/preprocess.py) of each training image, white
on black, [0, 1], as the runtime feeds control images. Loss: the teacher's, at the student's inference timesteps
(training/adapters.py). Captions name a position that need not be the image's, so the edge map, not the text, must
say where. Every `eval_every` steps the position adherence is measured (diffusers' ControlNet pipeline, a square's
edges at the left, prompts saying "at the right") and logged to RUN/controlnet.log; checkpoints every few minutes
to RUN/controlnet/ckpt.pt, and a rerun resumes. The folder is written in fp16 safetensors, as the student.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import adapters
from .shapes import POSITIONS
from .shipped_config import ShippedConfig
from .train import Checkpointer, Progress, _encode_text, _torch

log = logging.getLogger("edgediff.train.controlnet")


@dataclass
class ControlNetTrainConfig:
    # control image -> 16x16 latent grid in two stride-2 steps, as the VAE downsamples (export checks 2**(n-1))
    embedding_channels: tuple = (16, 32, 64)
    images: int = 8000  # rendered, edge-mapped and encoded once per run (under a minute)
    seed: int = 202  # a training seed (below 10**6), not the shipped model's 0 nor the LoRA's
    # Canny thresholds for the training edge maps: the runtime's defaults (100, 200) find no edge between colours
    # of near grey levels (red, blue and purple lie within 17 of each other); these find one for every pair but
    # red/purple. An edge map is the same outline at any thresholds that find it.
    canny_low: float = 20.0
    canny_high: float = 40.0
    # how often a caption names a position, and then a position drawn at random (the image's 1 time in 5): the
    # edge map must carry the place, or the ControlNet leans on the text and loses where the two disagree
    say_position: float = 0.7
    steps: int = 2000
    batch: int = 32
    lr: float = 5e-4  # a small network whose zero convolutions start it as the plain model; clipped gradients
    warmup: int = 100
    eval_every: int = 250  # position adherence on eval_prompts prompts (a few seconds each time)
    eval_prompts: int = 40

    def to_dict(self) -> dict:
        return asdict(self)


def smoke_config() -> ControlNetTrainConfig:
    return ControlNetTrainConfig(images=64, steps=3, batch=4, eval_every=3, eval_prompts=2)


def build_controlnet(unet, cfg: ControlNetTrainConfig):
    """ControlNetModel.from_unet without its weight copy, which requires the same time embedding (the student's has
    the LCM guidance projection, which ControlNets do not take), then the student's weights copied in."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=cfg.embedding_channels, load_weights_from_unet=False
    )
    net.conv_in.load_state_dict(unet.conv_in.state_dict())
    net.time_proj.load_state_dict(unet.time_proj.state_dict())
    time_embedding = {k: v for k, v in unet.time_embedding.state_dict().items() if not k.startswith("cond_proj.")}
    net.time_embedding.load_state_dict(time_embedding)
    net.down_blocks.load_state_dict(unet.down_blocks.state_dict())
    net.mid_block.load_state_dict(unet.mid_block.state_dict())
    return net


def edge_maps(images: np.ndarray, cfg: ControlNetTrainConfig) -> np.ndarray:
    """(N, H, W) uint8 edge masks of uint8 RGB images, as the runtime's canny_image computes them."""
    from PIL import Image

    from edgediff.runtime.preprocess import canny

    return np.stack(
        [
            canny(np.asarray(Image.fromarray(im).convert("L"), np.float32), cfg.canny_low, cfg.canny_high)
            for im in images
        ]
    ).astype(np.uint8)


def _edges(run: Path, images: np.ndarray, cfg: ControlNetTrainConfig) -> np.ndarray:
    path = run / "edges.npy"
    if not path.exists():
        np.save(run / "edges.partial.npy", edge_maps(images, cfg))
        (run / "edges.partial.npy").replace(path)
    return np.load(path)


def _caption(scene, rng, shipped: ShippedConfig, cfg: ControlNetTrainConfig) -> str:
    """The scene's caption with a position word drawn at random (said cfg.say_position of the time)."""
    return dataclasses.replace(
        scene,
        position=str(rng.choice(list(POSITIONS))),
        say_size=bool(rng.random() >= shipped.caption_omit),
        say_position=bool(rng.random() < cfg.say_position),
    ).caption


def adherence(tokenizer, text_encoder, unet, vae, controlnet, n: int) -> dict:
    """Position read at a left square's edges for n prompts saying "at the right" (diffusers' pipeline, 4 steps)."""
    import torch
    from diffusers import LCMScheduler, StableDiffusionControlNetPipeline

    from .adapter_eval import control_image, control_prompts, rate

    pipe = StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        controlnet=controlnet.eval(),
        scheduler=LCMScheduler.from_pretrained(adapters.student_dir() / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    scenes = control_prompts(n, "right")
    out = pipe(
        [s.caption for s in scenes],
        image=control_image("left"),
        num_inference_steps=4,
        guidance_scale=ShippedConfig().default_guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    images = [(im * 255).round().astype(np.uint8) for im in out]
    controlnet.train()
    return {"left": rate(images, "position", "left"), "right": rate(images, "position", "right")}


def train(cfg: ControlNetTrainConfig, run: Path, out: Path) -> Path:
    """Trains (or resumes) the ControlNet in RUN and writes the diffusers folder `out` (fp16 safetensors)."""
    from .ship import strip_local_paths

    torch = _torch()
    shipped = ShippedConfig()
    torch.manual_seed(cfg.seed)
    tokenizer, text_encoder, unet, vae = adapters.load_student()
    scenes = adapters.draw_scenes(cfg.seed, cfg.images)
    data = adapters.encode_set(run, scenes, scenes, cfg.seed, vae)
    edges = _edges(run, data["images"], cfg)
    scaling = vae.config.scaling_factor
    controlnet = build_controlnet(unet, cfg).train()
    params = list(controlnet.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    ckpt = Checkpointer(run / "controlnet", {"controlnet": controlnet, "opt": opt})
    start = ckpt.resume()
    progress = Progress("controlnet", cfg.steps, run)
    alphas = adapters.schedule_alphas(shipped)
    timesteps = adapters.inference_timesteps(shipped)
    rng = np.random.default_rng(cfg.seed + start)
    for step in range(start + 1, cfg.steps + 1):
        idx = np.sort(rng.choice(len(scenes), cfg.batch, replace=False))
        m, s = data["mean"][idx], data["std"][idx]
        z = torch.from_numpy((m + s * rng.standard_normal(m.shape).astype(np.float32)) * scaling)
        control = torch.from_numpy(edges[idx]).float()[:, None].expand(-1, 3, -1, -1)
        with torch.no_grad():
            cond = _encode_text(tokenizer, text_encoder, [_caption(scenes[i], rng, shipped, cfg) for i in idx], "cpu")
        t = torch.from_numpy(rng.choice(timesteps, len(idx)))
        x_t, noise, _ = adapters.noisy_batch(z, t, alphas, rng)
        down, mid = controlnet(x_t, t, cond, controlnet_cond=control, return_dict=False)
        pred = unet(
            x_t,
            t,
            cond,
            timestep_cond=adapters.guidance_cond(rng, len(idx), shipped),
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = adapters.diffusion_loss(pred, z, noise, t, alphas, shipped)
        lr = adapters.optimizer_step(opt, params, loss, cfg, step)
        metrics = {"loss": loss.item(), "lr": lr}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                read = adherence(tokenizer, text_encoder, unet, vae, controlnet, cfg.eval_prompts)
            metrics.update(read_left=read["left"], read_right=read["right"])
            line = f"controlnet step {step} eval position read at the control's place {read['left']:.3f}, at the prompt's {read['right']:.3f}"
            progress.log_file.write(line + "\n")
            log.info(line)
        progress(step, **metrics)
        ckpt.maybe_save(step)
    ckpt.maybe_save(cfg.steps, force=True)
    controlnet.eval().to(torch.float16).save_pretrained(out, safe_serialization=True)
    strip_local_paths(out)
    (run / "controlnet_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def main() -> None:
    adapters.run_trainer(
        train, ControlNetTrainConfig, smoke_config, "runs/controlnet-canny", "the diffusers ControlNet folder to write"
    )


if __name__ == "__main__":
    main()
