"""Multistep DPM-Solver++ on a discrete VP noise schedule, PixArt-Sigma's sampler.

Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models",
https://arxiv.org/abs/2211.01095. The schedule is schedule.py's, x_0 comes from parametrization.py, the
update is dpmsolver_update.py's (shared with the flow form). Matches diffusers' DPMSolverMultistepScheduler
without use_flow_sigmas (algorithm_type dpmsolver++ or sde-dpmsolver++, no sigma re-spacing, no thresholding).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Sampler
from .dpmsolver_update import MultistepDPMSolverPlusPlus
from .parametrization import predict_x0_scaled
from .schedule import ScheduleConfig


@dataclass(frozen=True)
class DPMScheduleConfig(ScheduleConfig):
    """The VP schedule plus DPMSolverMultistepScheduler's solver keys (diffusers' names)."""

    solver_order: int = 2  # 1, 2 or 3 previous model outputs
    algorithm_type: str = "dpmsolver++"  # "dpmsolver++" | "sde-dpmsolver++" (data-prediction forms)
    solver_type: str = "midpoint"  # second-order correction: "midpoint" | "heun"
    lower_order_final: bool = True  # first/second order for the last steps below 15 steps (stability)
    euler_at_final: bool = False  # first order at the last step whatever the step count
    lambda_min_clipped: float = -float("inf")  # drop the grid's end where log-SNR falls below this (cosine)
    use_flow_sigmas: bool = False  # on means the flow form: flow_dpmpp
    use_lu_lambdas: bool = False  # not supported here
    use_exponential_sigmas: bool = False  # not supported here
    use_beta_sigmas: bool = False  # not supported here
    thresholding: bool = False  # Imagen's dynamic thresholding (pixel-space models): not supported

    def validate(self) -> None:
        super().validate()
        choices = {
            "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
            "solver_type": ("midpoint", "heun"),
            "solver_order": (1, 2, 3),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"scheduler {name}={getattr(self, name)!r} is not supported; expected one of {allowed}"
                )
        if self.use_flow_sigmas:
            raise ValueError("use_flow_sigmas=True is DPM-Solver++'s flow form: use the flow_dpmpp sampler")
        for name in (
            "use_karras_sigmas",
            "use_lu_lambdas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "thresholding",
        ):
            if getattr(self, name):
                raise ValueError(f"scheduler {name}=True is not supported by edgediff's dpmpp sampler")


# DPMSolverMultistepScheduler's defaults where they differ from ScheduleConfig's (for configs that omit them)
_DIFFUSERS_DEFAULTS = {
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


class DPMSolverSampler(MultistepDPMSolverPlusPlus, Sampler):
    name = "dpmpp"
    config_class = DPMScheduleConfig
    config_defaults = _DIFFUSERS_DEFAULTS

    def __init__(self, config: DPMScheduleConfig):
        super().__init__(config)
        self.stochastic = config.algorithm_type == "sde-dpmsolver++"
        self.sigmas = np.zeros(0, np.float32)
        self._reset_solver()

    def set_timesteps(self, num_inference_steps: int) -> None:
        super().set_timesteps(num_inference_steps)
        train_sigmas = self.schedule.sigmas
        sigmas = np.interp(self.timesteps, np.arange(len(train_sigmas)), train_sigmas)
        if self.config.final_sigmas_type == "sigma_min":
            last = train_sigmas[0]
        else:
            last = 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self._reset_solver()

    def _timesteps(self, num_inference_steps: int) -> np.ndarray:
        cfg, steps = self.config, num_inference_steps
        # the grid ends where log-SNR drops below lambda_min_clipped (all of it for the default -inf)
        alphas = self.schedule.alphas_cumprod
        lambdas = np.log(np.sqrt(alphas)) - np.log(np.sqrt(np.float32(1) - alphas))
        last = cfg.num_train_timesteps - int(np.searchsorted(lambdas[::-1], cfg.lambda_min_clipped))
        # n + 1 points with the cleanest dropped, as diffusers (not schedule.spaced_timesteps' n points)
        if cfg.timestep_spacing == "linspace":
            return np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        if cfg.timestep_spacing == "leading":
            ratio = last // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg.steps_offset
        ratio = cfg.num_train_timesteps / steps  # trailing
        return np.arange(last, 0, -ratio).round().astype(np.int64) - 1

    def _alpha_sigma_lambda(self, index: int):
        # VE sigma -> VP coefficients: alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma alpha_t
        sigma = np.float32(self.sigmas[index])
        alpha = np.float32(1) / np.sqrt(sigma * sigma + np.float32(1))
        sigma_t = sigma * alpha
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma_t)
        return alpha, sigma_t, lam

    def _data_prediction(self, model_output, sample):
        alpha, sigma, _ = self._alpha_sigma_lambda(self.step_index)
        return predict_x0_scaled(self.config.prediction_type, model_output, sample, alpha, sigma)
