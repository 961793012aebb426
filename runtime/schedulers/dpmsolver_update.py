"""The multistep DPM-Solver++ update, shared by its diffusion (VP) and flow-matching forms.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
https://arxiv.org/abs/2211.01095 (multistep data-prediction solver, orders 1-3, midpoint/Heun second order,
and its SDE variant). The update only needs each grid point's (alpha_t, sigma_t, lambda_t = log(alpha_t /
sigma_t)) and the model's x_0: a form supplies those two (`_alpha_sigma_lambda`, `_data_prediction`), the
step below is the same for both, as in diffusers' DPMSolverMultistepScheduler.
"""

from __future__ import annotations

import numpy as np

from .base import SchedulerOutput


class MultistepDPMSolverPlusPlus:
    """Mixin for a Sampler with `sigmas` (one per timestep, then the final one) and a config carrying
    diffusers' solver keys: solver_order, solver_type, lower_order_final, euler_at_final, final_sigmas_type."""

    model_outputs: list[np.ndarray]
    lower_order_nums: int

    def _alpha_sigma_lambda(self, index: int):
        """(alpha_t, sigma_t, lambda_t) at grid point `index` of self.sigmas, as float32 scalars."""
        raise NotImplementedError

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """x_0 from the model output at the current step."""
        raise NotImplementedError

    def _reset_solver(self) -> None:
        self.model_outputs = []
        self.lower_order_nums = 0

    def _step(self, model_output, timestep, sample, noise) -> SchedulerOutput:
        cfg, i, n = self.config, self.step_index, len(self.timesteps)
        # lower orders at the end: few-step grids are unstable at high order, and a final sigma 0 always
        # takes a first-order step (its log-SNR is infinite)
        final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        second_last = i == n - 2 and cfg.lower_order_final and n < 15

        x0 = self._data_prediction(model_output, sample)
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
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lam_s = self._alpha_sigma_lambda(i)
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
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lam_s0 = self._alpha_sigma_lambda(i)
        _, _, lam_s1 = self._alpha_sigma_lambda(i - 1)
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
        alpha_t, sigma_t, lam_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s0, lam_s0 = self._alpha_sigma_lambda(i)
        _, _, lam_s1 = self._alpha_sigma_lambda(i - 1)
        _, _, lam_s2 = self._alpha_sigma_lambda(i - 2)
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
