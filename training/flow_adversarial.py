"""Adversarial fine-tuning of the distilled flow student, after reflow: Latent Adversarial Diffusion Distillation
(LADD; Sauer et al. 2024, https://arxiv.org/abs/2403.12015), scaled to the shapes model.

The reflow student regresses on the teacher's samples with an L2 loss, and where a caption allows several
drawings it draws their mean: corners and points blur, squares read as circles. An adversarial loss asks for
samples the teacher's own features cannot tell from the teacher's samples instead. As LADD:
- the discriminator is the frozen teacher transformer, read at every joint block's image tokens, with small
  trainable heads (projection-conditioned on the pooled text, a logit per token, hinge loss);
- real and fake samples are re-noised to the same random t before the teacher reads them;
- the teacher's samples (the reflow pairs) are the real data.
The student samples as its pipeline does (DMD2's backward simulation, https://arxiv.org/abs/2405.14867): x0 from
the pair's noise at t = 1, re-noised with fresh noise to second_sigma, x0 again. Both steps' x0 keep the reflow
regression on the pair's sample, weighted against the adversarial loss by the ratio of their gradients at the
last layer (Esser et al. 2021, https://arxiv.org/abs/2012.09841, eq. 7).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .flow import TextEncoding, _load_pairs, _load_teacher, flow_path
from .flow_config import FlowConfig
from .train import Checkpointer, Progress, _device, _torch


class TeacherFeatures:
    """The frozen teacher's image-token states after each joint block (forward hooks), for one call."""

    def __init__(self, teacher):
        self.teacher = teacher
        self.states: list = []
        for block in teacher.transformer_blocks:
            block.register_forward_hook(self._keep)

    def _keep(self, module, args, output):
        self.states.append(output[1])  # (encoder_hidden_states, hidden_states): the image tokens

    def __call__(self, x, t, cond, pooled) -> list:
        self.states = []
        self.teacher(hidden_states=x, encoder_hidden_states=cond, pooled_projections=pooled, timestep=t * 1000)
        return self.states


def discriminator_heads(cfg: FlowConfig):
    """One head per joint block: LayerNorm -> MLP -> a logit per token, plus the projection term <h, W pooled>
    (Miyato & Koyama 2018) that conditions it on the caption."""
    import torch
    import torch.nn as nn

    width = cfg.heads * cfg.head_dim
    pooled = cfg.clip_l_hidden + cfg.clip_g_hidden
    hidden = cfg.adv_head_width

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(
                nn.LayerNorm(width), nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
            )
            self.out = nn.Linear(hidden, 1)
            self.cond = nn.Linear(pooled, hidden)

        def forward(self, tokens, text):
            h = self.body(tokens)  # (B, N, hidden)
            return self.out(h).squeeze(-1) + (h * self.cond(text)[:, None]).sum(-1) / math.sqrt(hidden)

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList(Head() for _ in range(cfg.layers))

        def forward(self, states, text):
            return torch.cat([head(s, text) for head, s in zip(self.heads, states)], dim=1)  # (B, blocks * N)

    return Heads()


def student_two_steps(student, noise, cond, pooled, second_sigma: float, fresh):
    """(x0 after the first step, x0 after the re-noised second) as the student's pipeline samples them; the
    second step's input is detached (backward simulation: the first step learns from its own losses only)."""
    torch = _torch()
    n = len(noise)
    x1 = noise - student(noise, cond, pooled, torch.full((n,), 1000.0, device=noise.device)).sample
    sigma = torch.full((n,), second_sigma, device=noise.device)
    x_s, _ = flow_path(x1.detach(), fresh, sigma)
    x2 = x_s - second_sigma * student(x_s, cond, pooled, sigma * 1000).sample
    return x1, x2


def _adaptive_weight(rec, adv, layer, limit: float) -> float:
    """||d rec / d layer|| / ||d adv / d layer||, clamped: the adversarial loss pulls as hard as the regression."""
    torch = _torch()
    g_rec = torch.autograd.grad(rec, layer, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(adv, layer, retain_graph=True)[0].norm()
    return float(torch.clamp(g_rec / (g_adv + 1e-6), 0.0, limit))


def stage_adversarial(cfg: FlowConfig, run: Path) -> None:
    """Fine-tunes RUN/distill/transformer into RUN/adversarial/transformer (see the module's docstring)."""
    from diffusers import SD3Transformer2DModel

    torch = _torch()
    dev = _device()
    torch.manual_seed(cfg.seed + 15)
    noises, x0s, captions = _load_pairs(run)
    tokenizers, encoders, teacher = _load_teacher(run, dev)
    text = TextEncoding(cfg, tokenizers, encoders, teacher)
    features = TeacherFeatures(teacher)
    student = SD3Transformer2DModel.from_pretrained(run / "distill" / "transformer").to(dev).train()
    heads = discriminator_heads(cfg).to(dev)
    # beta1 = 0, as GAN fine-tuning usually runs (ADD, LADD): momentum lags the moving discriminator
    opt_g = torch.optim.AdamW(student.parameters(), lr=cfg.adv_lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_d = torch.optim.AdamW(heads.parameters(), lr=cfg.adv_head_lr, betas=(0.0, 0.99), weight_decay=0.0)
    ckpt = Checkpointer(run / "adversarial", {"student": student, "heads": heads, "opt_g": opt_g, "opt_d": opt_d})
    start = ckpt.resume()
    progress = Progress("adversarial", cfg.adv_steps, run)
    rng = np.random.default_rng(cfg.seed + 15 + start)
    batch = min(cfg.adv_batch, len(x0s))
    last_layer = student.proj_out.weight
    for step in range(start + 1, cfg.adv_steps + 1):
        idx = np.sort(rng.choice(len(x0s), batch, replace=False))
        x0 = torch.from_numpy(x0s[idx]).to(dev)
        noise = torch.from_numpy(noises[idx]).to(dev)
        keep = torch.from_numpy((rng.random(batch) >= cfg.t5_drop).astype(np.float32)).to(dev)
        with torch.no_grad():
            cond, pooled = text([captions[i] for i in idx], dev, t5_keep=keep)
        fresh = torch.from_numpy(rng.standard_normal(noise.shape).astype(np.float32)).to(dev)
        # 1. the student's two steps, as it samples
        x1, x2 = student_two_steps(student, noise, cond, pooled, cfg.second_sigma, fresh)
        fake, real = torch.cat([x1, x2]), torch.cat([x0, x0])
        cond2, pooled2 = torch.cat([cond, cond]), torch.cat([pooled, pooled])
        # 2. the teacher reads real and fake re-noised alike (same noise, same t)
        t = torch.from_numpy(rng.uniform(0.0, cfg.adv_t_high, 2 * batch).astype(np.float32)).to(dev)
        eps = torch.from_numpy(rng.standard_normal(real.shape).astype(np.float32)).to(dev)
        with torch.no_grad():
            real_states = features(flow_path(real, eps, t)[0], t, cond2, pooled2)
        fake_states = features(flow_path(fake, eps, t)[0], t, cond2, pooled2)
        # 3. the heads: hinge loss, per token
        d_loss = (
            torch.relu(1 - heads(real_states, pooled2)).mean()
            + torch.relu(1 + heads([s.detach() for s in fake_states], pooled2)).mean()
        )
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # 4. the student: regression on the pair's sample and the adversarial loss, balanced at the last layer
        rec = torch.nn.functional.mse_loss(fake, real)
        adv = -heads(fake_states, pooled2).mean()
        weight = cfg.adv_weight * _adaptive_weight(rec, adv, last_layer, cfg.adv_weight_limit)
        loss = rec + weight * adv
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt_g.step()
        progress(step, rec=rec.item(), adv=adv.item(), d=d_loss.item(), w=weight)
        ckpt.maybe_save(step)
    ckpt.maybe_save(cfg.adv_steps, force=True)
    student.save_pretrained(run / "adversarial" / "transformer")
