"""Latent Consistency Model multi-step sampler.

Luo et al. 2023, "Latent Consistency Models", https://arxiv.org/abs/2310.04378 (Algorithm 3).
Matches diffusers' LCMScheduler. The image is decoded from `denoised` after the last step.
"""

from __future__ import annotations

import numpy as np

from .base import Sampler, SchedulerOutput
from .parametrization import predict_x0_eps
from .schedule import discrete_distilled_timesteps

SIGMA_DATA = 0.5  # consistency-model boundary condition constant (Song et al. 2023)


class LCMSampler(Sampler):
    name = "lcm"
    stochastic = True

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        return discrete_distilled_timesteps(self.config, num_inference_steps)

    def _boundary_scalings(self, timestep: int) -> tuple[float, float]:
        scaled = timestep * self.config.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        return c_skip, c_out

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sch, i = self.schedule, self.step_index
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        a_prev = sch.alpha(prev_t)
        c_skip, c_out = self._boundary_scalings(t)
        x0, _ = predict_x0_eps(self.config.prediction_type, model_output, sample, sch.alpha(t))
        if self.config.clip_sample:
            x0 = np.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        denoised = (np.float32(c_out) * x0 + np.float32(c_skip) * sample).astype(np.float32)
        if i == self.num_inference_steps - 1:
            return SchedulerOutput(prev_sample=denoised, denoised=denoised)
        prev = a_prev**0.5 * denoised + (1 - a_prev) ** 0.5 * self._noise(noise, model_output.shape)
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=denoised)
