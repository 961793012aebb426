"""Multistep DPM-Solver++ in its flow-matching form, SANA's sampler.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
https://arxiv.org/abs/2211.01095 (its update is shared with the diffusion form: dpmsolver_update.py),
run on the flow path alpha_t = 1 - sigma, sigma_t = sigma as SANA does (Xie et al. 2024,
https://arxiv.org/abs/2410.10629). Matches diffusers' DPMSolverMultistepScheduler with use_flow_sigmas=True
and prediction_type="flow_prediction" (algorithm_type dpmsolver++ or sde-dpmsolver++, final sigma 0).
"""

from __future__ import annotations

import numpy as np

from .base import FlowSampler
from .dpmsolver_update import MultistepDPMSolverPlusPlus
from .parametrization import flow_x0_eps
from .schedule import FlowScheduleConfig, dpm_flow_sigmas


def _flow_coefficients(sigma):
    """Flow path coefficients and the half log-SNR lambda = log(alpha / sigma) (+inf at the clean end)."""
    sigma = np.float32(sigma)
    alpha = np.float32(1) - sigma
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


class FlowDPMSolverSampler(MultistepDPMSolverPlusPlus, FlowSampler):
    name = "flow_dpmpp"
    # diffusers' default: a config that omits prediction_type is an epsilon (VP) model's, not ours
    config_defaults = {"prediction_type": "epsilon"}

    def __init__(self, config: FlowScheduleConfig):
        super().__init__(config)
        if not config.use_flow_sigmas:
            raise ValueError(
                "the flow_dpmpp sampler needs use_flow_sigmas=True (a DPMSolverMultistepScheduler config without"
                " it is a VP-schedule solver for diffusion models, such as PixArt-Sigma's)"
            )
        self.stochastic = config.algorithm_type == "sde-dpmsolver++"
        self._reset_solver()

    def set_timesteps(self, num_inference_steps: int, mu: float | None = None) -> None:
        """`mu` sets flow_shift = exp(mu) for this grid (use_dynamic_shifting configs only)."""
        cfg = self.config
        steps = self._check_steps(num_inference_steps)
        if mu is not None and not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
            raise ValueError("mu is only accepted when use_dynamic_shifting is on (with exponential time shift)")
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is on: config.mu_for(image_seq_len)")
        # np.exp, not math.exp: diffusers' own call, to the last bit
        flow_shift = np.exp(mu) if mu is not None else cfg.flow_shift
        self.timesteps, self.sigmas = dpm_flow_sigmas(cfg.num_train_timesteps, steps, flow_shift)
        self.num_inference_steps = len(self.timesteps)
        self.step_index = 0
        self._reset_solver()

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """The forward process at `timestep`: (1 - sigma) x_0 + sigma noise."""
        alpha, sigma, _ = _flow_coefficients(self.sigmas[self._index_of(timestep)])
        return (alpha * original + sigma * noise).astype(np.float32)

    def _alpha_sigma_lambda(self, index: int):
        return _flow_coefficients(self.sigmas[index])

    def _data_prediction(self, model_output, sample):
        return flow_x0_eps(model_output, sample, self.sigmas[self.step_index])[0]
