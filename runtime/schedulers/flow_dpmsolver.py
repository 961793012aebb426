"""Multistep DPM-Solver++ in its flow-matching form, SANA's sampler.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
https://arxiv.org/abs/2211.01095 (multistep data-prediction solver, orders 1-3, midpoint/Heun second order),
run on the flow path alpha_t = 1 - sigma, sigma_t = sigma as SANA does (Xie et al. 2024,
https://arxiv.org/abs/2410.10629). Matches diffusers' DPMSolverMultistepScheduler with use_flow_sigmas=True
and prediction_type="flow_prediction" (algorithm_type dpmsolver++ or sde-dpmsolver++, final sigma 0).
"""

from __future__ import annotations

import numpy as np

from .base import FlowSampler, SchedulerOutput
from .parametrization import flow_x0_eps
from .schedule import FlowScheduleConfig, dpm_flow_sigmas


def _alpha_sigma_lambda(sigma):
    """Flow path coefficients and the half log-SNR lambda = log(alpha / sigma) (+inf at the clean end)."""
    sigma = np.float32(sigma)
    alpha = np.float32(1) - sigma
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)
    return alpha, sigma, lam


class FlowDPMSolverSampler(FlowSampler):
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
        self.model_outputs: list[np.ndarray] = []
        self.lower_order_nums = 0

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
        self.model_outputs = []
        self.lower_order_nums = 0

    def add_noise(self, original: np.ndarray, noise: np.ndarray, timestep) -> np.ndarray:
        """The forward process at `timestep`: (1 - sigma) x_0 + sigma noise."""
        alpha, sigma, _ = _alpha_sigma_lambda(self.sigmas[self._index_of(timestep)])
        return (alpha * original + sigma * noise).astype(np.float32)

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        cfg, i, n = self.config, self.step_index, len(self.timesteps)
        # lower orders at the end: few-step grids are unstable at high order, and the final sigma 0 always
        # takes a first-order step (its log-SNR is infinite)
        final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        second_last = i == n - 2 and cfg.lower_order_final and n < 15

        x0, _ = flow_x0_eps(model_output, sample, self.sigmas[i])
        self.model_outputs = [*self.model_outputs, x0][-cfg.solver_order :]
        z = self._noise(noise, sample.shape) if self.stochastic else None

        if cfg.solver_order == 1 or self.lower_order_nums < 1 or final:
            prev = self._first_order(sample, z)
        elif cfg.solver_order == 2 or self.lower_order_nums < 2 or second_last:
            prev = self._second_order(sample, z)
        else:
            prev = self._third_order(sample, z)
        self.lower_order_nums = min(self.lower_order_nums + 1, cfg.solver_order)
        return SchedulerOutput(prev_sample=prev.astype(np.float32), denoised=x0)

    def _first_order(self, sample, z):
        i, m0 = self.step_index, self.model_outputs[-1]
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s, lam_s = _alpha_sigma_lambda(self.sigmas[i])
        h = lam_t - lam_s
        if z is None:
            return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - 1.0)) * m0
        return (
            (sigma_t / sigma_s * np.exp(-h)) * sample
            + (alpha_t * (1 - np.exp(-2.0 * h))) * m0
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * z
        )

    def _second_order(self, sample, z):
        i = self.step_index
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s0, lam_s0 = _alpha_sigma_lambda(self.sigmas[i])
        _, _, lam_s1 = _alpha_sigma_lambda(self.sigmas[i - 1])
        h, h_0 = lam_t - lam_s0, lam_s0 - lam_s1
        r0 = h_0 / h
        d0, d1 = m0, (1.0 / r0) * (m0 - m1)
        midpoint = self.config.solver_type == "midpoint"
        if z is None:
            x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (np.exp(-h) - 1.0)) * d0
            if midpoint:
                return x_t - 0.5 * (alpha_t * (np.exp(-h) - 1.0)) * d1
            return x_t + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
        x_t = (sigma_t / sigma_s0 * np.exp(-h)) * sample + (alpha_t * (1 - np.exp(-2.0 * h))) * d0
        if midpoint:
            x_t = x_t + 0.5 * (alpha_t * (1 - np.exp(-2.0 * h))) * d1
        else:
            x_t = x_t + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
        return x_t + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * z

    def _third_order(self, sample, z):
        i = self.step_index
        m0, m1, m2 = self.model_outputs[-1], self.model_outputs[-2], self.model_outputs[-3]
        alpha_t, sigma_t, lam_t = _alpha_sigma_lambda(self.sigmas[i + 1])
        _, sigma_s0, lam_s0 = _alpha_sigma_lambda(self.sigmas[i])
        _, _, lam_s1 = _alpha_sigma_lambda(self.sigmas[i - 1])
        _, _, lam_s2 = _alpha_sigma_lambda(self.sigmas[i - 2])
        h, h_0, h_1 = lam_t - lam_s0, lam_s0 - lam_s1, lam_s1 - lam_s2
        r0, r1 = h_0 / h, h_1 / h
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        if z is None:
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (np.exp(-h) - 1.0)) * m0
                + (alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)) * d1
                - (alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2
            )
        return (
            (sigma_t / sigma_s0 * np.exp(-h)) * sample
            + (alpha_t * (1.0 - np.exp(-2.0 * h))) * m0
            + (alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            + (alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * d2
            + sigma_t * np.sqrt(1.0 - np.exp(-2 * h)) * z
        )
