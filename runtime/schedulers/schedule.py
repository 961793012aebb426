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
        if self.prediction_type in FLOW_PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type={self.prediction_type!r} is a flow-matching model's: diffusion samplers"
                " cannot drive it; use a flow sampler (FlowScheduleConfig)"
            )
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


# --- Flow matching (rectified flow): x_t = (1 - sigma) x_0 + sigma eps, sigma in [0, 1] ---------------------

FLOW_PREDICTION_TYPES = ("flow_prediction", "trigflow")  # velocity eps - x_0; SCM's trigonometric velocity
DIFFUSION_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class FlowScheduleConfig:
    """Flow-matching schedules and their solvers' settings, in diffusers' config names: FlowMatchEulerDiscrete-,
    DPMSolverMultistep- (with use_flow_sigmas) and SCMScheduler. Each sampler reads its own keys."""

    num_train_timesteps: int = 1000  # timesteps are sigma * this (the transformer's timestep scale)
    prediction_type: str = "flow_prediction"  # "flow_prediction" (velocity) | "trigflow" (SCM)
    # FlowMatchEulerDiscreteScheduler (SD3, FLUX)
    shift: float = 1.0  # SD3's static timestep shift (arXiv:2403.03206, sec. 5.3.2); SD3/3.5 use 3.0
    use_dynamic_shifting: bool = False  # FLUX.1-dev: shift from the image's token count (`mu`), per call
    base_shift: float = 0.5  # log-shift at base_image_seq_len tokens (calculate_shift)
    max_shift: float = 1.15  # log-shift at max_image_seq_len tokens
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"  # how mu shifts: exp(mu) / (exp(mu) + 1/t - 1), or mu / (mu + 1/t - 1)
    invert_sigmas: bool = False  # Mochi: sigmas run 0 -> 1
    shift_terminal: float | None = None  # LTX-Video: stretch the shifted grid to end at this sigma
    use_karras_sigmas: bool = False  # re-space the shifted sigmas (Karras et al. 2022, rho 7)
    use_exponential_sigmas: bool = False  # re-space them log-uniformly
    use_beta_sigmas: bool = False  # not supported: needs scipy's beta quantiles, not a runtime dependency
    stochastic_sampling: bool = False  # re-noise to the next sigma from x_0 instead of an Euler step
    # DPMSolverMultistepScheduler in its flow form (SANA)
    use_flow_sigmas: bool = False  # must be on: off means a VP-schedule DPM-Solver (PixArt-Sigma, SD)
    flow_shift: float = 1.0  # SANA: 3.0
    solver_order: int = 2  # 1, 2 or 3 previous model outputs
    algorithm_type: str = "dpmsolver++"  # "dpmsolver++" | "sde-dpmsolver++" (data-prediction forms)
    solver_type: str = "midpoint"  # second-order correction: "midpoint" | "heun"
    lower_order_final: bool = True  # first/second order for the last steps below 15 steps (stability)
    euler_at_final: bool = False  # first order at the last step whatever the step count
    final_sigmas_type: str = "zero"  # flow sigmas end at 0 (the clean sample)
    thresholding: bool = False  # Imagen's dynamic thresholding (pixel-space models): not supported
    # SCMScheduler (SANA-Sprint)
    sigma_data: float = 0.5  # data standard deviation of the TrigFlow parametrisation

    @classmethod
    def from_dict(cls, config: dict) -> "FlowScheduleConfig":
        """Builds from a diffusers scheduler config, ignoring keys that no flow sampler reads."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in config.items() if k in known and v is not None})
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        if self.prediction_type in DIFFUSION_PREDICTION_TYPES:
            raise ValueError(
                f"scheduler prediction_type={self.prediction_type!r} is a diffusion model's (epsilon / v / sample):"
                " flow samplers drive flow-matching models only; use a diffusion sampler (euler, ddim, ...)"
            )
        choices = {
            "prediction_type": FLOW_PREDICTION_TYPES,
            "time_shift_type": ("exponential", "linear"),
            "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
            "solver_type": ("midpoint", "heun"),
            "final_sigmas_type": ("zero",),
            "solver_order": (1, 2, 3),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"scheduler {name}={getattr(self, name)!r} is not supported; expected one of {allowed}"
                )
        if self.use_karras_sigmas + self.use_exponential_sigmas + self.use_beta_sigmas > 1:
            raise ValueError("only one of use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas can be on")
        for name in ("use_beta_sigmas", "thresholding"):
            if getattr(self, name):
                raise ValueError(f"scheduler {name}=True is not supported by edgediff's flow samplers")
        if int(self.num_train_timesteps) < 1 or float(self.sigma_data) <= 0:
            raise ValueError("num_train_timesteps must be >= 1 and sigma_data > 0")

    def mu_for(self, image_seq_len: int) -> float:
        """The dynamic-shifting `mu` for an image of `image_seq_len` transformer tokens, from this config's
        bounds, as the FLUX and SD3 pipelines compute it."""
        return calculate_shift(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent log-shift `mu`: linear in the image's token count, through
    (base_seq_len, base_shift) and (max_seq_len, max_shift); as diffusers' pipeline_flux.calculate_shift.
    FLUX's token count is (height / 16) * (width / 16): 8x VAE, then 2x2 patches."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's timestep shift (arXiv:2403.03206, sec. 5.3.2): more steps at high noise for larger images."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Dynamic shifting by `mu` (diffusers' FlowMatchEulerDiscreteScheduler.time_shift, its sigma = 1)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def flow_match_sigmas(
    config: FlowScheduleConfig,
    num_inference_steps: int,
    shift: float,
    sigmas=None,
    mu: float | None = None,
    timesteps=None,
) -> tuple[np.ndarray, np.ndarray]:
    """FlowMatchEulerDiscreteScheduler's grid: (timesteps, sigmas with the final 0 or 1 appended), float32.

    Kept in diffusers' order and dtypes (float64 for its own grid, float32 for passed-in sigmas) so the
    samplers match it bit for bit; this includes its double shift of the last sigma when `shift` is static.
    """
    n_train = config.num_train_timesteps
    # the training grid, shifted once at construction (as diffusers' __init__); only its ends are used
    train = np.linspace(1, n_train, n_train, dtype=np.float32)[::-1].copy() / n_train
    if not config.use_dynamic_shifting:
        train = shift_sigmas(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])

    given_timesteps = timesteps is not None
    if given_timesteps:
        timesteps = np.array(timesteps).astype(np.float32)
    if sigmas is None:
        if timesteps is None:
            timesteps = np.linspace(sigma_max * n_train, sigma_min * n_train, num_inference_steps)
        sigmas = timesteps / n_train
    else:
        sigmas = np.array(sigmas).astype(np.float32)
        num_inference_steps = len(sigmas)

    if config.use_dynamic_shifting:
        sigmas = time_shift(mu, sigmas, config.time_shift_type)
    else:
        sigmas = shift_sigmas(sigmas, shift)
    if config.shift_terminal:
        one_minus = 1 - sigmas
        # a grid at sigma 1 alone (one step) has no span to stretch and stays as it is; diffusers divides 0 by 0
        # there and samples with NaN sigmas
        if one_minus[-1] != 0:
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    if config.use_karras_sigmas:
        sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), num_inference_steps)
    elif config.use_exponential_sigmas:
        sigmas = np.exp(np.linspace(math.log(sigmas[0].item()), math.log(sigmas[-1].item()), num_inference_steps))

    sigmas = np.asarray(sigmas).astype(np.float32)
    timesteps = timesteps.astype(np.float32) if given_timesteps else sigmas * np.float32(n_train)
    if config.invert_sigmas:  # Mochi: the model sees 1 - sigma
        sigmas = np.float32(1.0) - sigmas
        timesteps = sigmas * np.float32(n_train)
        return timesteps, np.concatenate([sigmas, np.ones(1, np.float32)])
    return timesteps, np.concatenate([sigmas, np.zeros(1, np.float32)])


def dpm_flow_sigmas(num_train_timesteps: int, num_inference_steps: int, flow_shift: float):
    """DPMSolverMultistepScheduler's flow grid (use_flow_sigmas): n shifted sigmas from just below 1, then 0;
    integer timesteps (sigma * 1000, truncated, as diffusers casts them)."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    sigmas = 1.0 - alphas
    sigmas = np.flip(shift_sigmas(sigmas, flow_shift))[:-1].copy()
    timesteps = (sigmas * num_train_timesteps).astype(np.int64)
    return timesteps, np.concatenate([sigmas, [0.0]]).astype(np.float32)
