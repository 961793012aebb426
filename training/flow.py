"""Trains the second shipped model, an SD3-family flow-matching transformer, stage by stage, resumable:
data -> latents -> teacher -> pairs -> distill -> adversarial -> assemble.

    python -m training.flow all --run runs/shipped-flow          # or one stage: teacher, pairs, ...
    python -m training.flow all --run runs/flow-smoke --smoke    # a few steps of each (tests)

The shipped model's VAE is reused as it is; two tiny CLIP encoders and a tiny T5 train jointly with a small
SD3Transformer2DModel by rectified flow (Esser et al. 2024), which is then distilled to two steps by reflow on
its own guided samples (Liu et al. 2022; InstaFlow), the second step re-noised (consistency models' multistep
sampling), and fine-tuned adversarially against the teacher's features (LADD; training/flow_adversarial.py).
Checkpoints and resumption as training/train.py (its helpers); a finished stage leaves
RUN/<stage>.done and is skipped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np

from edgediff.models.shipped import SHIPPED_DIR

from .flow_config import FlowConfig
from .shipped_config import VOCABULARY
from .train import (
    Checkpointer,
    Progress,
    _batch_latents,
    _captions,
    _device,
    _latents,
    _load_data,
    _to_tensor,
    _torch,
    stage_data,
)
from .train import command_line as train_command_line
from .train import run_stages as train_run_stages

log = logging.getLogger("edgediff.train.flow")
STAGES = ("data", "latents", "teacher", "pairs", "distill", "adversarial", "assemble")
SHIPPED_VAE = SHIPPED_DIR / "diffusers" / "vae"
ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5: the pipeline's names


# ----------------------------------------------------------------------------- latents


def stage_latents(cfg: FlowConfig, run: Path) -> None:
    """The shipped VAE, unchanged but for shift_factor 0 (StableDiffusion3Pipeline adds it when decoding: None
    fails), saved where training.train's latent helpers read it, and the training set encoded once."""
    from diffusers import AutoencoderKL

    torch = _torch()
    dev = _device()
    images, _ = _load_data(run)
    vae = AutoencoderKL.from_pretrained(SHIPPED_VAE, torch_dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)
    vae.save_pretrained(run / "vae" / "final")
    vae.to(dev).eval()
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            dist = vae.encode(_to_tensor(images[i : i + 256]).to(dev)).latent_dist
            means.append(dist.mean.cpu().numpy())
            stds.append(dist.std.cpu().numpy())
    np.save(run / "vae" / "latent_mean.npy", np.concatenate(means).astype(np.float32))
    np.save(run / "vae" / "latent_std.npy", np.concatenate(stds).astype(np.float32))


# ----------------------------------------------------------------------------- models


def build_tokenizers(cfg: FlowConfig, out: Path):
    """CLIP-L's, CLIP-G's (padding with "!", as SDXL's and SD3's OpenCLIP) and T5's, offline from the vocabulary."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from edgediff.models.tokenizer_build import build_clip_tokenizer, build_t5_tokenizer

    return (
        CLIPTokenizer.from_pretrained(build_clip_tokenizer(out / "tokenizer", VOCABULARY, max_length=cfg.max_length)),
        CLIPTokenizer.from_pretrained(
            build_clip_tokenizer(out / "tokenizer_2", VOCABULARY, max_length=cfg.max_length, pad_token="!")
        ),
        T5TokenizerFast.from_pretrained(build_t5_tokenizer(out / "tokenizer_3", VOCABULARY, max_length=cfg.t5_length)),
    )


def _clip(cfg: FlowConfig, tokenizer, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=hidden * 4,
            num_attention_heads=cfg.clip_heads,
            num_hidden_layers=cfg.clip_layers,
            max_position_embeddings=cfg.max_length,
            projection_dim=hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_act="gelu",
        )
    )


def build_text_encoders(cfg: FlowConfig, tokenizers):
    from transformers import T5Config, T5EncoderModel

    tok_l, tok_g, tok_t5 = tokenizers
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok_t5),
            d_model=cfg.t5_hidden,
            d_kv=cfg.t5_hidden // cfg.t5_heads,
            d_ff=cfg.t5_ff,
            num_layers=cfg.t5_layers,
            num_heads=cfg.t5_heads,
            relative_attention_num_buckets=cfg.t5_buckets,
            relative_attention_max_distance=cfg.t5_length * 2,
            feed_forward_proj="gated-gelu",  # T5 v1.1's, as SD3's T5-XXL
            dropout_rate=0.0,
            pad_token_id=tok_t5.pad_token_id,
            eos_token_id=tok_t5.eos_token_id,
        )
    )
    return _clip(cfg, tok_l, cfg.clip_l_hidden), _clip(cfg, tok_g, cfg.clip_g_hidden), t5


def build_transformer(cfg: FlowConfig):
    from diffusers import SD3Transformer2DModel

    latent = cfg.image_size // 4  # the shipped VAE downsamples by 4
    return SD3Transformer2DModel(
        sample_size=latent,
        patch_size=cfg.patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.t5_hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=cfg.clip_l_hidden + cfg.clip_g_hidden,
        pos_embed_max_size=latent // cfg.patch_size,  # the domain's one size
        qk_norm=cfg.qk_norm,
    )


def build_scheduler(cfg: FlowConfig):
    """The teacher's: SD3's flow Euler ODE."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)


def build_student_scheduler(cfg: FlowConfig):
    """The student's: the teacher's, with re-noised steps (stochastic_sampling) on a grid stretched to end at
    second_sigma, so that cfg.default_steps = 2 runs 1 -> second_sigma -> 0."""
    teacher = build_scheduler(cfg)
    return type(teacher).from_config(teacher.config, stochastic_sampling=True, shift_terminal=cfg.second_sigma)


class TextEncoding:
    """Captions to (joint text states, pooled text) through StableDiffusion3Pipeline.encode_prompt itself, so that
    training conditions the transformer exactly as the pipeline (and edgediff's runtime) will."""

    def __init__(self, cfg: FlowConfig, tokenizers, encoders, transformer):
        from diffusers import StableDiffusion3Pipeline

        self.cfg = cfg
        self.pipe = StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=None,
            vae=None,
            text_encoder=encoders[0],
            tokenizer=tokenizers[0],
            text_encoder_2=encoders[1],
            tokenizer_2=tokenizers[1],
            text_encoder_3=encoders[2],
            tokenizer_3=tokenizers[2],
        )

    def __call__(self, captions: list[str], dev, t5_keep=None):
        """`t5_keep`: (B,) 0/1 per caption; 0 zeroes T5's states (as the pipeline without text_encoder_3)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            captions, None, None, device=dev, do_classifier_free_guidance=False, max_sequence_length=self.cfg.t5_length
        )
        if t5_keep is not None:
            clip_tokens = self.pipe.tokenizer_max_length
            embeds = _torch().cat([embeds[:, :clip_tokens], embeds[:, clip_tokens:] * t5_keep.view(-1, 1, 1)], dim=1)
        return embeds, pooled


def flow_path(x0, noise, t):
    """(x_t, velocity) on the straight path x_t = (1 - t) x0 + t noise: the input and the target of the
    transformer, whose output the sampler reads as x0 = x_t - t v (runtime.schedulers.parametrization)."""
    tt = t.view(-1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, noise - x0


def _sample_t(rng, n: int, cfg: FlowConfig):
    """SD3's logit-normal timesteps (sec. 3.1), then its resolution-dependent shift."""
    t = 1 / (1 + np.exp(-rng.normal(cfg.logit_mean, cfg.logit_std, n)))
    return (cfg.shift * t / (1 + (cfg.shift - 1) * t)).astype(np.float32)


def _lr(base: float, step: int, total: int, warmup: int) -> float:
    # linear warmup, then cosine to a tenth (as the shipped teacher)
    return base * min(1.0, step / max(warmup, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))


# ----------------------------------------------------------------------------- teacher


def stage_teacher(cfg: FlowConfig, run: Path) -> None:
    """Rectified flow (Esser et al. 2024, https://arxiv.org/abs/2403.03206, eq. 1-3): x_t = (1 - t) x0 + t noise,
    the transformer predicts the velocity noise - x0 (plain MSE), t logit-normal; empty captions for CFG."""
    torch = _torch()
    dev = _device()
    torch.manual_seed(cfg.seed + 12)
    _, scenes = _load_data(run)
    mean, std, scaling = _latents(run, cfg)
    tokenizers = build_tokenizers(cfg, run / "teacher")
    encoders = build_text_encoders(cfg, tokenizers)
    transformer = build_transformer(cfg)
    models = torch.nn.ModuleDict({"transformer": transformer, **dict(zip(ENCODERS, encoders))}).to(dev)
    text = TextEncoding(cfg, tokenizers, encoders, transformer)
    params = list(models.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.teacher_lr, weight_decay=0.01)
    ema = torch.optim.swa_utils.AveragedModel(
        models, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay)
    )
    ckpt = Checkpointer(run / "teacher", {"models": models, "opt": opt, "ema": ema})
    start = ckpt.resume()
    progress = Progress("teacher", cfg.teacher_steps, run)
    rng = np.random.default_rng(cfg.seed + 12 + start)
    for step in range(start + 1, cfg.teacher_steps + 1):
        idx = np.sort(rng.choice(len(scenes), cfg.teacher_batch, replace=False))
        x0 = _batch_latents(mean, std, idx, scaling, rng, dev)
        keep = torch.from_numpy((rng.random(len(idx)) >= cfg.t5_drop).astype(np.float32)).to(dev)
        cond, pooled = text(_captions(scenes, idx, rng, cfg, cfg.cfg_dropout), dev, t5_keep=keep)
        t = torch.from_numpy(_sample_t(rng, len(idx), cfg)).to(dev)
        x_t, target = flow_path(x0, torch.randn_like(x0), t)
        # the pipeline's timestep is sigma * num_train_timesteps
        pred = transformer(hidden_states=x_t, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t * 1000)
        loss = torch.nn.functional.mse_loss(pred.sample, target)
        lr = _lr(cfg.teacher_lr, step, cfg.teacher_steps, cfg.teacher_warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update_parameters(models)
        progress(step, loss=loss.item(), lr=lr)
        ckpt.maybe_save(step)
    ckpt.maybe_save(cfg.teacher_steps, force=True)
    for name, module in ema.module.items():
        module.save_pretrained(run / "teacher" / name)


def _load_teacher(run: Path, dev):
    """The teacher's (EMA) tokenizers, encoders and transformer, frozen."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    folder = run / "teacher"
    tokenizers = (
        CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        T5TokenizerFast.from_pretrained(folder / "tokenizer_3"),
    )
    encoders = tuple(
        cls.from_pretrained(folder / name).to(dev).eval().requires_grad_(False)
        for cls, name in zip((CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel), ENCODERS)
    )
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer").to(dev).eval().requires_grad_(False)
    return tokenizers, encoders, transformer


# ----------------------------------------------------------------------------- reflow pairs


def sample_teacher(transformer, cond, pooled, uncond, uncond_pooled, noise, steps: int, cfg: FlowConfig):
    """The teacher's guided Euler ODE from `noise` (t = 1) to t = 0, on the scheduler's own sigmas and with
    CFG as StableDiffusion3Pipeline (uncond + w (cond - uncond)): what the teacher pipeline draws."""
    torch = _torch()
    scheduler = build_scheduler(cfg)
    scheduler.set_timesteps(steps)
    sig = scheduler.sigmas.tolist()
    x = noise
    both_text, both_pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = torch.full((2 * len(x),), s * 1000, device=x.device)
        v_u, v_c = transformer(torch.cat([x, x]), both_text, both_pooled, t).sample.chunk(2)
        x = x + (s_next - s) * (v_u + cfg.guidance * (v_c - v_u))
    return x


def stage_pairs(cfg: FlowConfig, run: Path) -> None:
    """(noise, teacher sample) pairs with the guidance baked in, as InstaFlow's reflow data
    (https://arxiv.org/abs/2309.06380, sec. 3): chunk by chunk, each deterministic in its index (resume skips
    the chunks already written)."""
    torch = _torch()
    dev = _device()
    _, scenes = _load_data(run)
    tokenizers, encoders, transformer = _load_teacher(run, dev)
    text = TextEncoding(cfg, tokenizers, encoders, transformer)
    out = run / "pairs"
    out.mkdir(parents=True, exist_ok=True)
    chunks = math.ceil(cfg.pair_count / cfg.pair_chunk)
    progress = Progress("pairs", chunks, run)
    with torch.no_grad():
        uncond, uncond_pooled = text([""], dev)
        for c in range(chunks):
            path = out / f"chunk_{c:05d}.npz"
            if path.exists():
                continue
            n = min(cfg.pair_chunk, cfg.pair_count - c * cfg.pair_chunk)
            rng = np.random.default_rng(cfg.seed + 13 + 1000 * c)
            idx = rng.choice(len(scenes), n, replace=False)
            captions = _captions(scenes, idx, rng, cfg, 0.0)
            side = cfg.image_size // 4
            noise = torch.from_numpy(rng.standard_normal((n, 4, side, side)).astype(np.float32)).to(dev)
            cond, pooled = text(captions, dev)
            x0 = sample_teacher(
                transformer,
                cond,
                pooled,
                uncond.expand(n, -1, -1),
                uncond_pooled.expand(n, -1),
                noise,
                cfg.pair_steps,
                cfg,
            )
            tmp = out / f"writing_{c:05d}.npz"  # not chunk_*: a half-written file is never read as pairs
            np.savez(tmp, noise=noise.cpu().numpy(), x0=x0.cpu().numpy(), captions=np.array(captions))
            tmp.replace(path)
            log.info("pairs chunk %d/%d written, %.0f s", c + 1, chunks, time.time() - progress.start)
            progress(c + 1, std=float(x0.std()))


def _load_pairs(run: Path):
    files = sorted((run / "pairs").glob("chunk_*.npz"))
    parts = [np.load(f) for f in files]
    return (
        np.concatenate([p["noise"] for p in parts]),
        np.concatenate([p["x0"] for p in parts]),
        [str(c) for p in parts for c in p["captions"]],
    )


# ----------------------------------------------------------------------------- distill


def stage_distill(cfg: FlowConfig, run: Path) -> None:
    """Reflow (Liu et al. 2022, https://arxiv.org/abs/2209.03003, the 2-rectified flow): the student, started as
    the teacher, learns the straight path between each pair, x_t = (1 - t) x0 + t noise with velocity
    noise - x0, at t ~ U(0, 1); a share of the batch at t = 1 exactly is InstaFlow's one-step distillation on the
    same pairs (L2 in latent space instead of LPIPS). Another share trains the re-noised second step: a pair's
    sample with fresh noise (cfg.renoise_*). Conditioned on the caption alone: no CFG at run time."""
    import copy

    torch = _torch()
    dev = _device()
    torch.manual_seed(cfg.seed + 14)
    noises, x0s, captions = _load_pairs(run)
    tokenizers, encoders, teacher = _load_teacher(run, dev)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    text = TextEncoding(cfg, tokenizers, encoders, teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_lr, weight_decay=0.0)
    ckpt = Checkpointer(run / "distill", {"student": student, "opt": opt})
    start = ckpt.resume()
    progress = Progress("distill", cfg.distill_steps, run)
    rng = np.random.default_rng(cfg.seed + 14 + start)
    batch = min(cfg.distill_batch, len(x0s))
    for step in range(start + 1, cfg.distill_steps + 1):
        idx = np.sort(rng.choice(len(x0s), batch, replace=False))
        x0 = torch.from_numpy(x0s[idx]).to(dev)
        noise = torch.from_numpy(noises[idx]).to(dev)
        keep = torch.from_numpy((rng.random(batch) >= cfg.t5_drop).astype(np.float32)).to(dev)  # as the teacher
        with torch.no_grad():
            cond, pooled = text([captions[i] for i in idx], dev, t5_keep=keep)
        t = rng.uniform(0.0, 1.0, batch).astype(np.float32)
        share = rng.random(batch)
        t[share < cfg.one_step_fraction] = 1.0
        renoised = (share >= cfg.one_step_fraction) & (share < cfg.one_step_fraction + cfg.renoise_fraction)
        t[renoised] = rng.uniform(cfg.renoise_low, cfg.renoise_high, int(renoised.sum()))
        fresh = torch.from_numpy(rng.standard_normal(noise.shape).astype(np.float32)).to(dev)
        noise = torch.where(torch.from_numpy(renoised).to(dev).view(-1, 1, 1, 1), fresh, noise)
        t = torch.from_numpy(t).to(dev)
        x_t, target = flow_path(x0, noise, t)
        pred = student(hidden_states=x_t, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t * 1000)
        loss = torch.nn.functional.mse_loss(pred.sample, target)
        for g in opt.param_groups:
            g["lr"] = cfg.distill_lr * min(1.0, step / 100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        progress(step, loss=loss.item())
        ckpt.maybe_save(step)
    ckpt.maybe_save(cfg.distill_steps, force=True)
    student.save_pretrained(run / "distill" / "transformer")


# ----------------------------------------------------------------------------- assemble


def stage_assemble(cfg: FlowConfig, run: Path, out: Path | None = None) -> Path:
    """Writes the diffusers StableDiffusion3Pipeline folders: the student (after its adversarial stage) and the
    teacher."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = out or run / "assembled"
    tokenizers, encoders, teacher = _load_teacher(run, "cpu")
    common = dict(
        scheduler=build_scheduler(cfg),
        vae=AutoencoderKL.from_pretrained(run / "vae" / "final"),
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=encoders[2],
        tokenizer_3=tokenizers[2],
    )
    student = SD3Transformer2DModel.from_pretrained(run / "adversarial" / "transformer")
    StableDiffusion3Pipeline(
        transformer=student, **{**common, "scheduler": build_student_scheduler(cfg)}
    ).save_pretrained(out / "student")
    StableDiffusion3Pipeline(transformer=teacher, **common).save_pretrained(out / "teacher")
    (out / "training_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return out


def stage_adversarial(cfg: FlowConfig, run: Path) -> None:
    from .flow_adversarial import stage_adversarial as fine_tune  # it builds on this module

    fine_tune(cfg, run)


RUNNERS = {
    "data": stage_data,
    "latents": stage_latents,
    "teacher": stage_teacher,
    "pairs": stage_pairs,
    "distill": stage_distill,
    "adversarial": stage_adversarial,
    "assemble": stage_assemble,
}


def smoke_config() -> FlowConfig:
    """The real architecture, a few steps of everything on a few images: keeps the scripts alive in CI."""
    return FlowConfig(
        train_images=64,
        teacher_steps=3,
        teacher_batch=4,
        teacher_warmup=1,
        pair_count=6,
        pair_chunk=4,
        pair_steps=2,
        distill_steps=3,
        distill_batch=4,
        adv_steps=2,
        adv_batch=4,
    )


def run_stages(stages, run: Path, cfg: FlowConfig) -> None:
    train_run_stages(stages, run, cfg, RUNNERS)


def main() -> None:
    train_command_line(__doc__, STAGES, RUNNERS, Path("runs/shipped-flow"), FlowConfig, smoke_config)


if __name__ == "__main__":
    main()
