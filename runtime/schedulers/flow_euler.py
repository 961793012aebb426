"""Flow-matching Euler sampler (rectified flow), SD3's and FLUX's.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis",
https://arxiv.org/abs/2403.03206 (the Euler ODE step on x_t = (1 - sigma) x_0 + sigma eps, and the
timestep shift of sec. 5.3.2). Matches diffusers' FlowMatchEulerDiscreteScheduler: static `shift` (SD3,
SD3.5), dynamic shifting by `mu` from the image's token count (FLUX.1-dev, see calculate_shift), passed-in
`sigmas` (the FLUX pipeline's), `time_shift_type`, `shift_terminal`, `invert_sigmas`, Karras and
exponential re-spacing, and `stochastic_sampling`.
"""

from __future__ import annotations

import numpy as np

from .base import FlowSampler, SchedulerOutput
from .parametrization import flow_x0_eps
from .schedule import FlowScheduleConfig, flow_match_sigmas


class FlowEulerSampler(FlowSampler):
    name = "flow_euler"

    def __init__(self, config: FlowScheduleConfig):
        super().__init__(config)
        self.shift = float(config.shift)  # diffusers' set_shift changes it per instance
        self.stochastic = bool(config.stochastic_sampling)

    def set_timesteps(
        self, num_inference_steps: int | None = None, sigmas=None, mu: float | None = None, timesteps=None
    ):
        """As diffusers: `sigmas` or `timesteps` replace the default grid (FLUX passes
        sigmas=np.linspace(1, 1 / steps, steps)); `mu` is required when the config shifts dynamically."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError(
                "mu must be passed when use_dynamic_shifting is on: calculate_shift(image_seq_len, ...) or"
                " config.mu_for(image_seq_len)"
            )
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError("sigmas and timesteps must have the same length")
        given = sigmas if sigmas is not None else timesteps
        if num_inference_steps is None:
            if given is None:
                raise ValueError("pass num_inference_steps, sigmas or timesteps")
            num_inference_steps = len(given)
        elif given is not None and len(given) != num_inference_steps:
            raise ValueError(f"{len(given)} sigmas/timesteps given for num_inference_steps={num_inference_steps}")
        steps = self._check_steps(num_inference_steps)
        self.timesteps, self.sigmas = flow_match_sigmas(cfg, steps, self.shift, sigmas, mu, timesteps)
        self.num_inference_steps = len(self.timesteps)
        self.step_index = 0

    def scale_noise(self, sample: np.ndarray, timestep, noise: np.ndarray) -> np.ndarray:
        """The forward process at `timestep` (image-to-image's start): sigma noise + (1 - sigma) sample."""
        sigma = self.sigmas[self._index_of(timestep)]
        return (sigma * noise + (np.float32(1.0) - sigma) * sample).astype(np.float32)

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """scale_noise under the other samplers' name and argument order."""
        return self.scale_noise(original, timestep, noise)

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0, _ = flow_x0_eps(model_output, sample, sigma)
        if self.stochastic:
            # re-noise the x_0 estimate to the next level with fresh noise instead of following the ODE
            prev = (np.float32(1.0) - sigma_next) * x0 + sigma_next * self._noise(noise, sample.shape)
        else:
            prev = sample + (sigma_next - sigma) * model_output
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0)
