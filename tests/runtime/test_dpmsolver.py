"""DPM-Solver++ on a VP schedule (PixArt-Sigma's sampler) against diffusers' DPMSolverMultistepScheduler, step for
step, with PixArt-Sigma's published scheduler settings (tests/scheduler_configs.py) and variations of them."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from scheduler_configs import PIXART_SIGMA, SD15  # noqa: E402

from edgediff.runtime.schedulers import make_sampler, sampler_for_scheduler  # noqa: E402

DPM_ATOL = 1e-5  # the bound between our sampler and diffusers' on identical inputs, per unit of latent scale
# Random model outputs are no real epsilon: x_0 = (x - sigma_t eps) / alpha_t grows to ~1e2 at the noisy end
# (1 / alpha_t ~ 150 for PixArt's schedule), where one float32 ulp is ~1e-5 and numpy's sqrt/log and torch's
# differ in the last bit. The bound scales with the latents' magnitude there (1e-7 relative at ~100).

CASES = [
    ("pixart-sigma", PIXART_SIGMA, [1, 2, 4, 20, 25]),
    ("pixart-sigma-heun", {**PIXART_SIGMA, "solver_type": "heun"}, [6]),
    ("pixart-sigma-order3", {**PIXART_SIGMA, "solver_order": 3}, [6, 20]),
    ("pixart-sigma-no-lower-final", {**PIXART_SIGMA, "lower_order_final": False}, [6]),
    ("pixart-sigma-euler-final", {**PIXART_SIGMA, "euler_at_final": True, "final_sigmas_type": "sigma_min"}, [6]),
    ("pixart-sigma-sigma-min", {**PIXART_SIGMA, "final_sigmas_type": "sigma_min"}, [6, 20]),
    ("pixart-sigma-sde", {**PIXART_SIGMA, "algorithm_type": "sde-dpmsolver++"}, [1, 6]),
    ("pixart-sigma-sde-heun", {**PIXART_SIGMA, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, [6]),
    ("pixart-sigma-sde-order3", {**PIXART_SIGMA, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, [6]),
    ("pixart-sigma-v", {**PIXART_SIGMA, "prediction_type": "v_prediction"}, [6]),
    ("pixart-sigma-leading", {**PIXART_SIGMA, "timestep_spacing": "leading", "steps_offset": 1}, [7]),
    ("pixart-sigma-trailing", {**PIXART_SIGMA, "timestep_spacing": "trailing"}, [7]),
    ("cosine-clipped", {**PIXART_SIGMA, "beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1}, [8]),
    ("sd15", SD15, [10]),
]


def _close(ours, theirs):
    theirs = np.asarray(theirs)
    scale = max(1.0, float(np.abs(theirs).max()))
    np.testing.assert_allclose(ours, theirs, atol=DPM_ATOL * scale, rtol=0)


@pytest.mark.parametrize(
    "config,steps",
    [(cfg, n) for _, cfg, all_steps in CASES for n in all_steps],
    ids=[f"{name}-{n}" for name, _, all_steps in CASES for n in all_steps],
)
def test_dpmsolver_matches_diffusers(monkeypatch, config, steps):
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    assert sampler_for_scheduler("DPMSolverMultistepScheduler", dict(theirs.config)) == "dpmpp"
    ours = make_sampler("dpmpp", dict(theirs.config), prediction_type=config.get("prediction_type", "epsilon"))
    theirs.set_timesteps(steps)  # PixArtSigmaPipeline: num_inference_steps only
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    _close(ours.sigmas, theirs.sigmas.numpy())
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)

    shape = (2, 4, 8, 8)
    rng = np.random.default_rng(steps)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    patch_diffusers_noise(monkeypatch, diffusers.schedulers.scheduling_dpmsolver_multistep, noises)
    our_noise = ReplayNoise(noises)
    sample = rng.standard_normal(shape).astype(np.float32)
    start, their_sample = sample.copy(), torch.from_numpy(sample.copy())
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        model_output = rng.standard_normal(shape).astype(np.float32)
        mine = ours.step(model_output, t_ours, sample, noise=our_noise)
        ref = theirs.step(torch.from_numpy(model_output), t_theirs, their_sample)
        _close(mine.prev_sample, ref.prev_sample.numpy())
        _close(mine.denoised, theirs.model_outputs[-1].numpy())  # the x_0 the solver extrapolates from
        sample, their_sample = mine.prev_sample, ref.prev_sample
    assert np.abs(sample - start).max() > 0.1  # the comparison can fail: the steps moved the sample


def test_dpmsolver_defaults_are_diffusers():
    # a config that omits the schedule takes DPMSolverMultistepScheduler's defaults, not SD's
    ours, theirs = make_sampler("dpmpp", {}), diffusers.DPMSolverMultistepScheduler()
    ours.set_timesteps(5)
    theirs.set_timesteps(5)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    _close(ours.sigmas, theirs.sigmas.numpy())


@pytest.mark.parametrize(
    "config,match",
    [
        ({**PIXART_SIGMA, "use_flow_sigmas": True}, "flow_dpmpp"),
        ({**PIXART_SIGMA, "use_karras_sigmas": True}, "use_karras_sigmas"),
        ({**PIXART_SIGMA, "thresholding": True}, "thresholding"),
        ({**PIXART_SIGMA, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type"),
        ({**PIXART_SIGMA, "solver_order": 4}, "solver_order"),
        ({**PIXART_SIGMA, "prediction_type": "flow_prediction"}, "flow"),
    ],
)
def test_unsupported_settings_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        make_sampler("dpmpp", config)


def test_sde_without_noise_is_a_clear_error():
    sampler = make_sampler("dpmpp", {**PIXART_SIGMA, "algorithm_type": "sde-dpmsolver++"})
    sampler.set_timesteps(2)
    latents = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="stochastic"):
        sampler.step(latents, sampler.timesteps[0], latents)
