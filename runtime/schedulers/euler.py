"""Euler sampler in sigma space.

Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
https://arxiv.org/abs/2206.00364 (Algorithm 2 without churn). Matches diffusers'
EulerDiscreteScheduler (SD-Turbo's scheduler, with "trailing" spacing).
"""

from __future__ import annotations

import numpy as np

from .base import Sampler, SchedulerOutput
from .parametrization import predict_x0_eps
from .schedule import karras_sigmas, sigma_to_timestep, spaced_timesteps


class EulerSampler(Sampler):
    name = "euler"

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        cfg = self.config
        timesteps = spaced_timesteps(cfg, num_inference_steps).astype(np.float32)
        train_sigmas = self.schedule.sigmas
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if cfg.use_karras_sigmas:
            sigmas = karras_sigmas(sigmas[-1], sigmas[0], num_inference_steps)
            log_sigmas = np.log(train_sigmas)
            timesteps = np.array([sigma_to_timestep(s, log_sigmas) for s in sigmas], dtype=np.float32)
        last = train_sigmas[0] if cfg.final_sigmas_type == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps.astype(np.float32)

    @property
    def init_noise_sigma(self) -> float:
        top = float(self.sigmas.max())
        # With "leading" spacing the first sigma is below the top of the schedule, as in diffusers.
        return top if self.config.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        # sigma space: x = x0 + sigma noise, at the sigma of that step (diffusers: step_indices = begin index)
        index = int(np.nonzero(np.isclose(self.timesteps, float(timestep)))[0][0])
        return (original + noise * self.sigmas[index]).astype(np.float32)

    def scale_model_input(self, sample: np.ndarray, timestep) -> np.ndarray:
        sigma = self.sigmas[self.step_index]
        return (sample / ((sigma**2 + 1) ** 0.5)).astype(np.float32)

    def _denoise(self, model_output, sample, sigma):
        # Express the sigma-space point in VP form for the shared parametrisation.
        sigma = np.float64(sigma)
        scale = (sigma**2 + 1) ** 0.5
        x0, _ = predict_x0_eps(self.config.prediction_type, model_output, sample / scale, 1 / (sigma**2 + 1))
        return x0

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = self._denoise(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_next - sigma)
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0.astype(np.float32))
