"""What the denoiser predicts, and how to turn it into (x_0, epsilon).

Written once for the variance-preserving form x_t = sqrt(a) x_0 + sqrt(1 - a) eps; samplers that
work in sigma space (Euler) pass a = 1 / (1 + sigma^2) and the sample divided by sqrt(1 + sigma^2).
A new parametrisation (flow matching, say) is one new branch here, not a change to each sampler.
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


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
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return x0.astype(np.float32), eps.astype(np.float32)
