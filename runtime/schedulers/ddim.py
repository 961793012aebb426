"""DDIM sampler.

Song et al. 2020, "Denoising Diffusion Implicit Models", https://arxiv.org/abs/2010.02502 (eq. 12).
Matches diffusers' DDIMScheduler (clip_sample and thresholding off, as SD's configs set them).
"""

from __future__ import annotations

import numpy as np

from .base import Sampler, SchedulerOutput
from .parametrization import predict_x0_eps
from .schedule import spaced_timesteps


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, config, eta: float = 0.0):
        super().__init__(config)
        self.eta = eta  # 0 = deterministic DDIM; 1 = DDPM-like ancestral noise
        self.stochastic = eta > 0

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        if self.config.timestep_spacing == "linspace":
            return spaced_timesteps(self.config, num_inference_steps).round().astype(np.int64)
        return spaced_timesteps(self.config, num_inference_steps).astype(np.int64)

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sch = self.schedule
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        a_t, a_prev = sch.alpha(t), sch.alpha(prev_t)
        x0, eps = predict_x0_eps(self.config.prediction_type, model_output, sample, a_t)
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)  # eps stays the model's, as diffusers without use_clipped_model_output
        variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
        std = np.float32(self.eta * variance**0.5)
        prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            prev = prev + std * self._noise(noise, model_output.shape)
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0.astype(np.float32))
