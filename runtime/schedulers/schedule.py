"""The noise schedule: betas, cumulative alphas, sigmas and timestep spacings.

Kept apart from the model's parametrisation (parametrization.py) and from each sampler's
step (one file per sampler), after stable-diffusion.cpp's split: a new sampler reuses the
schedule, a new parametrisation reuses every sampler.

Arithmetic follows diffusers' schedulers (float32 betas and cumulative products) so that
every sampler matches its diffusers counterpart step for step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np

SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class ScheduleConfig:
    """Everything about the training noise schedule and its sampling grid (diffusers' config names)."""

    num_train_timesteps: int = 1000  # length of the training chain; all timesteps index into it
    beta_start: float = 0.00085  # SD 1.x/2.x value; first beta of the training schedule
    beta_end: float = 0.012  # SD 1.x/2.x value; last beta of the training schedule
    beta_schedule: str = "scaled_linear"  # "linear" | "scaled_linear" | "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # what the denoiser outputs: "epsilon" | "v_prediction" | "sample"
    timestep_spacing: str = "leading"  # how inference timesteps are picked: linspace | leading | trailing
    steps_offset: int = 1  # added to "leading" timesteps (SD's configs use 1)
    set_alpha_to_one: bool = False  # DDIM/LCM/TCD: alpha used after the last step (1 or alphas_cumprod[0])
    clip_sample: bool = False  # DDIM/LCM: clip predicted x_0 to +-clip_sample_range (pixel-space models; SD sets False)
    clip_sample_range: float = 1.0  # bound used when clip_sample is on
    rescale_betas_zero_snr: bool = False  # arXiv:2305.08891: make the last timestep pure noise
    original_inference_steps: int = 50  # LCM/TCD: the distillation grid the inference steps are drawn from
    timestep_scaling: float = 10.0  # LCM: scales t in the consistency boundary condition
    use_karras_sigmas: bool = False  # Euler family: Karras et al. 2022 sigma spacing
    final_sigmas_type: str = "zero"  # Euler family: last sigma is 0 ("zero") or the smallest ("sigma_min")
    interpolation_type: str = "linear"  # Euler family: sigmas interpolated linearly over timesteps

    @classmethod
    def from_dict(cls, config: dict) -> "ScheduleConfig":
        """Builds from a diffusers scheduler config, ignoring keys that no sampler here reads."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in known and v is not None})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        choices = {
            "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
            "prediction_type": ("epsilon", "v_prediction", "sample"),
            "timestep_spacing": SPACINGS,
            "final_sigmas_type": ("zero", "sigma_min"),
            "interpolation_type": ("linear",),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"scheduler {name}={getattr(self, name)!r} is not supported; expected one of {allowed}"
                )


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace computed as torch.linspace does (float32 step, symmetric halves, one rounding).

    numpy's float32 linspace differs from torch's in the last bit for ~15% of entries; diffusers builds
    betas with torch, so we reproduce its arithmetic to keep every sampler bit-close to diffusers'.
    """
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    out = np.where(i < n // 2, np.float64(a) + step * i, np.float64(b) - step * (n - 1 - i))
    return out.astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021, as diffusers' betas_for_alpha_bar("cosine").
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # arXiv:2305.08891, Algorithm 1.
    alphas_bar_sqrt = np.sqrt(np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)


class NoiseSchedule:
    """Discrete variance-preserving schedule: x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps."""

    def __init__(self, config: ScheduleConfig):
        self.config = config
        n = config.num_train_timesteps
        if config.beta_schedule == "linear":
            betas = _linspace_f32(config.beta_start, config.beta_end, n)
        elif config.beta_schedule == "scaled_linear":
            betas = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n) ** 2
        else:
            betas = _cosine_betas(n)
        if config.rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas.astype(np.float32)
        # torch's CPU cumprod accumulates float32 in float64; so do we.
        self.alphas_cumprod = np.cumprod((np.float32(1.0) - self.betas).astype(np.float64)).astype(np.float32)
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def alpha(self, timestep: int) -> np.float32:
        """a_t for an integer timestep; negative timesteps mean 'after the last step'."""
        return self.alphas_cumprod[int(timestep)] if timestep >= 0 else self.final_alpha_cumprod

    @property
    def sigmas(self) -> np.ndarray:
        """Variance-exploding view of the same schedule: x = x_0 + sigma eps, sigma = sqrt((1 - a) / a)."""
        alphas = self.alphas_cumprod.copy()
        if self.config.rescale_betas_zero_snr:
            alphas[-1] = 2.0**-24  # as diffusers' sigma samplers: keeps the zero-SNR sigma finite
        return (((1 - alphas) / alphas) ** 0.5).astype(np.float32)


def spaced_timesteps(config: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """Inference timesteps in descending order, as float64 (callers round or cast as their sampler does)."""
    n, steps = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float64)[::-1].copy()
    if config.timestep_spacing == "leading":
        ratio = n // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float64) + config.steps_offset
    ratio = n / steps  # trailing
    return np.round(np.arange(n, 0, -ratio)).astype(np.float64) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364), eq. 5."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """Fractional timestep whose sigma is `sigma` (log-linear interpolation, as diffusers)."""
    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), 0, len(log_sigmas) - 2))
    high = low + 1
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])
    w = np.clip(w, 0, 1)
    return float((1 - w) * low + w * high)


def discrete_distilled_timesteps(config: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """LCM/TCD grid: `num_inference_steps` evenly-indexed picks from the `original_inference_steps` grid."""
    original = config.original_inference_steps
    k = config.num_train_timesteps // original
    origin = np.arange(1, original + 1) * k - 1
    if num_inference_steps > original:
        raise ValueError(
            f"num_inference_steps={num_inference_steps} exceeds this model's distillation grid of {original} steps"
        )
    origin = origin[::-1].copy()
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[idx]
