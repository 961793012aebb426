"""What the denoiser predicts, and how to turn it into (x_0, epsilon).

Written once for the variance-preserving form x_t = sqrt(a) x_0 + sqrt(1 - a) eps; samplers that
work in sigma space (Euler) pass a = 1 / (1 + sigma^2) and the sample divided by sqrt(1 + sigma^2).
A new parametrisation is one new branch here, not a change to each sampler.

Flow matching (rectified flow) has its own forward process, x_t = (1 - sigma) x_0 + sigma eps with
sigma in [0, 1], and a velocity output v = eps - x_0 (Lipman et al. 2022, https://arxiv.org/abs/2210.02747;
Liu et al. 2022, https://arxiv.org/abs/2209.03003): `flow_x0_eps`, shared by the flow samplers. SCM's
TrigFlow form (x_t = cos(t) x_0 + sin(t) eps, Lu & Song 2024, https://arxiv.org/abs/2410.11081) and its
conversion from a flow model's velocity sit beside it.
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_PREDICTION_TYPES = ("flow_prediction", "trigflow")


def predict_x0_eps(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod_t
) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x_0, epsilon) from the model output at a point whose cumulative alpha is `alpha_prod_t`."""
    # float64 inside: the latents are small, and it keeps us within float32 rounding of diffusers
    # even where Euler's first sigma (~15) amplifies it.
    model_output, sample = model_output.astype(np.float64), sample.astype(np.float64)
    alpha = np.float64(alpha_prod_t)
    sqrt_a, sqrt_b = np.sqrt(alpha), np.sqrt(1.0 - alpha)
    if prediction_type == "epsilon":
        eps = model_output
        x0 = (sample - sqrt_b * eps) / sqrt_a
    elif prediction_type == "v_prediction":
        # Salimans & Ho 2022 (arXiv:2202.00512): v = sqrt(a) eps - sqrt(1 - a) x_0.
        x0 = sqrt_a * sample - sqrt_b * model_output
        eps = sqrt_a * model_output + sqrt_b * sample
    elif prediction_type == "sample":
        x0 = model_output
        eps = (sample - sqrt_a * x0) / sqrt_b
    elif prediction_type in FLOW_PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is a flow model's: use flow_x0_eps / trigflow_x0")
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return x0.astype(np.float32), eps.astype(np.float32)


def predict_x0_scaled(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_t, sigma_t
) -> np.ndarray:
    """x_0 from the model output at a point x_t = alpha_t x_0 + sigma_t eps, in float32 throughout: DPM-Solver++
    feeds x_0 back into its multistep update, and there 1 / alpha_t (~150 at a VP grid's noisy end) makes
    any other rounding than diffusers' visible."""
    alpha_t, sigma_t = np.float32(alpha_t), np.float32(sigma_t)
    if prediction_type == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif prediction_type == "v_prediction":
        x0 = alpha_t * sample - sigma_t * model_output
    elif prediction_type == "sample":
        x0 = model_output
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")
    return x0.astype(np.float32)


def flow_x0_eps(velocity: np.ndarray, sample: np.ndarray, sigma) -> tuple[np.ndarray, np.ndarray]:
    """Returns (x_0, epsilon) from a flow model's velocity at noise level `sigma`: x_0 = x_t - sigma v,
    eps = x_t + (1 - sigma) v."""
    # float32 throughout, as diffusers: the multistep solver feeds x_0 back, so its rounding must match
    sigma = np.float32(sigma)
    x0 = sample - sigma * velocity
    eps = sample + (np.float32(1) - sigma) * velocity
    return x0.astype(np.float32), eps.astype(np.float32)


def trigflow_x0(model_output: np.ndarray, sample: np.ndarray, angle) -> np.ndarray:
    """x_0 from a TrigFlow velocity F = cos(t) eps - sin(t) x_0 at angle t: x_0 = cos(t) x_t - sin(t) F."""
    angle = np.float32(angle)
    return (np.cos(angle) * sample - np.sin(angle) * model_output).astype(np.float32)


def trigflow_to_flow_time(angle) -> np.float32:
    """The flow time s whose point x_s = x_t / (cos t + sin t) is TrigFlow's at angle t: s = sin / (cos + sin)."""
    angle = np.float32(angle)
    return np.float32(np.sin(angle) / (np.cos(angle) + np.sin(angle)))


def flow_to_trigflow(velocity: np.ndarray, flow_sample: np.ndarray, s) -> np.ndarray:
    """TrigFlow's F from a flow model's velocity v at flow time s and its input x_s (SANA-Sprint's conversion):
    F = ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)."""
    s = np.float32(s)
    norm = np.sqrt(s**2 + (1 - s) ** 2)
    return (((1 - 2 * s) * flow_sample + (1 - 2 * s + 2 * s**2) * velocity) / norm).astype(np.float32)
