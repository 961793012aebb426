"""Trajectory Consistency Distillation sampler (strategic stochastic sampling).

Zheng et al. 2024, "Trajectory Consistency Distillation", https://arxiv.org/abs/2402.19159.
Matches diffusers' TCDScheduler; `eta` is the paper's gamma (0 = deterministic).
"""

from __future__ import annotations

import numpy as np

from .base import Sampler, SchedulerOutput
from .parametrization import predict_x0_eps
from .schedule import discrete_distilled_timesteps


class TCDSampler(Sampler):
    name = "tcd"
    stochastic = True  # with the default eta; eta = 0 makes it deterministic

    def __init__(self, config, eta: float = 0.3):
        super().__init__(config)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"TCD eta (gamma) must be in [0, 1], got {eta}")
        self.eta = eta  # diffusers' default; the paper's gamma
        self.stochastic = eta > 0

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        return discrete_distilled_timesteps(self.config, num_inference_steps)

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sch, i = self.schedule, self.step_index
        t = int(timestep)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else 0
        s = int(np.floor((1 - self.eta) * prev_t))
        a_prev, a_s = sch.alpha(prev_t), sch.alpha(s)
        x0, eps = predict_x0_eps(self.config.prediction_type, model_output, sample, sch.alpha(t))
        noised = (a_s**0.5 * x0 + (1 - a_s) ** 0.5 * eps).astype(np.float32)
        if self.eta > 0 and i != self.num_inference_steps - 1:
            ratio = a_prev / a_s
            prev = ratio**0.5 * noised + (1 - ratio) ** 0.5 * self._noise(noise, model_output.shape)
        else:
            prev = noised
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0.astype(np.float32))
