"""Euler ancestral sampler: an Euler step down to sigma_down, then fresh noise up to sigma_next.

Karras et al. 2022, https://arxiv.org/abs/2206.00364, as in k-diffusion's sample_euler_ancestral
(Song et al. 2021, https://arxiv.org/abs/2011.13456, for the ancestral split). Matches diffusers'
EulerAncestralDiscreteScheduler.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput
from .euler import EulerSampler


class EulerAncestralSampler(EulerSampler):
    name = "euler_ancestral"
    stochastic = True

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sigma_from, sigma_to = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = self._denoise(model_output, sample, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma_from
        prev = sample + derivative * (sigma_down - sigma_from)
        # diffusers draws noise at every step, the last (sigma_up = 0) included; so do we, to stay in step.
        prev = prev + self._noise(noise, model_output.shape) * sigma_up
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0.astype(np.float32))
