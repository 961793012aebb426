"""The flow-matching samplers against diffusers' schedulers, step by step, with the published models' scheduler
settings and the calls their diffusers pipelines make (SD3 / SD3.5, FLUX.1, SANA, SANA-Sprint)."""

import inspect
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from scheduler_configs import PIXART_SIGMA, SD15  # noqa: E402

from edgediff.runtime import schedulers  # noqa: E402
from edgediff.runtime.schedulers import (  # noqa: E402
    DIFFUSERS_CLASS_TO_SAMPLER,
    SAMPLER_TO_DIFFUSERS_CLASS,
    SAMPLERS,
    FlowScheduleConfig,
    ScheduleConfig,
    calculate_shift,
    check_sampler_fits,
    make_sampler,
    sampler_for_scheduler,
)
from edgediff.runtime.schedulers.parametrization import flow_x0_eps  # noqa: E402

FLOW_ATOL = 1e-5  # the bound between our sampler and diffusers' on identical inputs
FLOW_RTOL = 1e-6  # float32 rounding of timesteps on the 0-1000 scale

# --- Published scheduler settings (each repository's scheduler/scheduler_config.json, as values) -------------
SD3_MEDIUM = {  # stabilityai/stable-diffusion-3-medium-diffusers, FlowMatchEulerDiscreteScheduler
    "num_train_timesteps": 1000,
    "shift": 3.0,
}
SD35_LARGE = {  # stabilityai/stable-diffusion-3.5-large (and -medium), FlowMatchEulerDiscreteScheduler
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": False,
}
# stabilityai/stable-diffusion-3.5-large-turbo (gated; its file was not read here): SD3.5 Large's schedule,
# which its model card runs for 4 steps at guidance 0
SD35_LARGE_TURBO = {**SD35_LARGE}
FLUX1_SCHNELL = {  # black-forest-labs/FLUX.1-schnell, FlowMatchEulerDiscreteScheduler
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
FLUX1_DEV = {**FLUX1_SCHNELL, "shift": 3.0, "use_dynamic_shifting": True}  # black-forest-labs/FLUX.1-dev
LTX_VIDEO = {  # Lightricks/LTX-Video: dynamic shifting with its own bounds and a terminal sigma
    "base_image_seq_len": 1024,
    "base_shift": 0.95,
    "invert_sigmas": False,
    "max_image_seq_len": 4096,
    "max_shift": 2.05,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.1,
    "use_dynamic_shifting": True,
}
SANA_1600M_1024PX = {  # Efficient-Large-Model/Sana_1600M_1024px_diffusers, DPMSolverMultistepScheduler (flow form)
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": -math.inf,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
SANA_SPRINT = {  # Efficient-Large-Model/Sana_Sprint_1.6B_1024px_diffusers, SCMScheduler (diffusers' defaults)
    "num_train_timesteps": 1000,
    "prediction_type": "trigflow",
    "sigma_data": 0.5,
}

MODULES = {
    "flow_euler": "scheduling_flow_match_euler_discrete",
    "flow_dpmpp": "scheduling_dpmsolver_multistep",
    "scm": "scheduling_scm",
}


def _flux_seq_len(height: int, width: int) -> int:
    # the FLUX pipeline's latents.shape[1]: 8x VAE, then 2x2 patches packed into tokens
    return (height // 16) * (width // 16)


def _pipeline_call(call: str, steps: int, config: dict) -> dict:
    """set_timesteps' arguments as each diffusers pipeline passes them."""
    if call == "sd3":  # StableDiffusion3Pipeline: num_inference_steps only (no dynamic shifting in its configs)
        return {"num_inference_steps": steps}
    if call == "timesteps":  # any pipeline given custom timesteps
        return {"timesteps": list(np.linspace(1000.0, 100.0, steps))}
    size = {"flux-1024": (1024, 1024), "flux-512": (512, 512), "flux-768x1360": (768, 1360)}[call]
    # FluxPipeline: sigmas linspace(1, 1/steps) and mu from the token count, whatever the config's shifting
    mu = calculate_shift(
        _flux_seq_len(*size),
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}


def _close(ours, theirs):
    np.testing.assert_allclose(ours, np.asarray(theirs), atol=FLOW_ATOL, rtol=FLOW_RTOL)


def _run_both(monkeypatch, name, ours, theirs, shape, seed, after_step=None):
    """Steps both from the same sample with the same model outputs and noise; checks every step's output
    (and calls `after_step(ours_out, theirs_out)` while both samplers still hold that step's state)."""
    rng = np.random.default_rng(seed)
    n = len(ours.timesteps)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]
    patch_diffusers_noise(monkeypatch, getattr(diffusers.schedulers, MODULES[name]), noises)
    our_noise = ReplayNoise(noises)
    sample = rng.standard_normal(shape).astype(np.float32) * np.float32(ours.init_noise_sigma)
    their_sample, start = torch.from_numpy(sample.copy()), sample.copy()
    outs = []
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        model_output = rng.standard_normal(shape).astype(np.float32)
        mine = ours.step(model_output, t_ours, sample, noise=our_noise)
        ref = theirs.step(torch.from_numpy(model_output), t_theirs, their_sample)
        _close(mine.prev_sample, ref.prev_sample.numpy())
        if after_step is not None:
            after_step(mine, ref)
        outs.append((mine, ref))
        sample, their_sample = mine.prev_sample, ref.prev_sample
    # the comparison can fail: the steps moved the sample
    assert np.abs(sample - start).max() > 0.1
    return outs


# --- Flow-matching Euler -----------------------------------------------------------------------------------
EULER_CASES = [
    ("sd3-medium", SD3_MEDIUM, "sd3", [1, 2, 4, 28]),
    ("sd3.5-large", SD35_LARGE, "sd3", [1, 28, 40]),
    ("sd3.5-large-turbo", SD35_LARGE_TURBO, "sd3", [1, 4]),
    ("flux1-schnell", FLUX1_SCHNELL, "flux-1024", [1, 2, 4]),
    ("flux1-dev", FLUX1_DEV, "flux-1024", [1, 4, 28, 50]),
    ("flux1-dev-512", FLUX1_DEV, "flux-512", [1, 28]),
    ("flux1-dev-768x1360", FLUX1_DEV, "flux-768x1360", [20]),
    ("flux1-dev-linear-shift", {**FLUX1_DEV, "time_shift_type": "linear"}, "flux-1024", [4]),
    ("sd3-stochastic", {**SD3_MEDIUM, "stochastic_sampling": True}, "sd3", [1, 4]),
    ("ltx-terminal", LTX_VIDEO, "flux-1024", [2, 8]),
    ("sd3-karras", {**SD3_MEDIUM, "use_karras_sigmas": True}, "sd3", [6]),
    ("sd3-exponential", {**SD3_MEDIUM, "use_exponential_sigmas": True}, "sd3", [6]),
    ("sd3-inverted", {**SD3_MEDIUM, "invert_sigmas": True}, "sd3", [4]),
    ("sd3-custom-timesteps", SD3_MEDIUM, "timesteps", [1, 4]),
]


@pytest.mark.parametrize(
    "config,call,steps",
    [(cfg, call, n) for _, cfg, call, all_steps in EULER_CASES for n in all_steps],
    ids=[f"{name}-{n}" for name, _, _, all_steps in EULER_CASES for n in all_steps],
)
def test_flow_euler_matches_diffusers(monkeypatch, config, call, steps):
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = make_sampler("flow_euler", dict(theirs.config))  # the export records the resolved config like this
    kwargs = _pipeline_call(call, steps, config)
    theirs.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    _close(ours.timesteps, theirs.timesteps.numpy())
    _close(ours.sigmas, theirs.sigmas.numpy())
    assert ours.init_noise_sigma == 1.0  # the flow pipelines draw unit noise
    shape = (2, 64, 64) if call.startswith("flux") else (2, 16, 8, 8)  # FLUX's packed tokens; SD3's latents
    for mine, _ in _run_both(monkeypatch, "flow_euler", ours, theirs, shape, seed=steps):
        assert mine.denoised is not None and mine.denoised.shape == shape


def test_flow_euler_denoised_is_the_flow_x0():
    ours = make_sampler("flow_euler", SD3_MEDIUM)
    ours.set_timesteps(4)
    rng = np.random.default_rng(0)
    x, v = rng.standard_normal((2, 1, 4, 4)).astype(np.float32), rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    sigma = ours.sigmas[0]
    out = ours.step(v, ours.timesteps[0], x)
    np.testing.assert_allclose(out.denoised, x - sigma * v, atol=FLOW_ATOL)
    # x_t = (1 - sigma) x_0 + sigma eps holds for the parametrization's pair
    x0, eps = flow_x0_eps(v, x, sigma)
    np.testing.assert_allclose((1 - sigma) * x0 + sigma * eps, x, atol=FLOW_ATOL)
    np.testing.assert_allclose(eps - x0, v, atol=FLOW_ATOL)


@pytest.mark.parametrize("config,call", [(SD3_MEDIUM, "sd3"), (FLUX1_DEV, "flux-1024")], ids=["sd3", "flux1-dev"])
@pytest.mark.parametrize("begin", [0, 3, 9])
def test_scale_noise_matches_diffusers(config, call, begin):
    """Image-to-image's start, as StableDiffusion3Img2ImgPipeline: set_begin_index, then scale_noise."""
    steps = 10
    theirs = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
    ours = make_sampler("flow_euler", dict(theirs.config))
    kwargs = _pipeline_call(call, steps, config)
    theirs.set_timesteps(**kwargs)
    ours.set_timesteps(**kwargs)
    fresh = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)  # begin_index unset: by timestep
    fresh.set_timesteps(**kwargs)
    theirs.set_begin_index(begin)
    ours.begin(begin)
    rng = np.random.default_rng(begin)
    x, noise = (rng.standard_normal((2, 16, 8, 8)).astype(np.float32) for _ in range(2))
    t = theirs.timesteps[begin].repeat(2)
    ref = theirs.scale_noise(torch.from_numpy(x), t, torch.from_numpy(noise)).numpy()
    _close(ours.scale_noise(x, ours.timesteps[begin], noise), ref)
    _close(ours.add_noise(x, noise, ours.timesteps[begin]), ref)
    _close(
        ours.add_noise(x, noise, ours.timesteps[begin]),
        fresh.scale_noise(torch.from_numpy(x), t, torch.from_numpy(noise)),
    )


@pytest.mark.parametrize("height,width", [(256, 256), (512, 512), (1024, 1024), (768, 1360), (2048, 2048)])
def test_calculate_shift_matches_the_pipelines(height, width):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift as flux_shift
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift as sd3_shift

    seq = _flux_seq_len(height, width)
    assert calculate_shift(seq) == flux_shift(seq) == sd3_shift(seq)
    assert calculate_shift(seq, 1024, 4096, 0.95, 2.05) == flux_shift(seq, 1024, 4096, 0.95, 2.05)
    assert FlowScheduleConfig.from_dict(LTX_VIDEO).mu_for(seq) == flux_shift(seq, 1024, 4096, 0.95, 2.05)


def test_dynamic_shifting_follows_the_image_size():
    """FLUX.1-dev: a larger image shifts the grid towards noise; mu changes the sigmas, not the step count."""
    grids = {}
    for size in (512, 1024):
        sampler = make_sampler("flow_euler", FLUX1_DEV)
        sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=sampler.config.mu_for(_flux_seq_len(size, size)))
        grids[size] = sampler.sigmas
    assert grids[512][0] == grids[1024][0] == 1.0 and grids[512][-1] == grids[1024][-1] == 0.0
    assert (grids[1024][1:-1] > grids[512][1:-1]).all()


# --- DPM-Solver++ (flow) -----------------------------------------------------------------------------------
DPM_CASES = [
    ("sana-1600m-1024px", SANA_1600M_1024PX, [1, 2, 3, 5, 14, 15, 20]),
    ("sana-order3", {**SANA_1600M_1024PX, "solver_order": 3}, [1, 3, 4, 10, 16]),
    ("sana-heun", {**SANA_1600M_1024PX, "solver_type": "heun"}, [5, 20]),
    ("sana-order1", {**SANA_1600M_1024PX, "solver_order": 1}, [4]),
    ("sana-euler-at-final", {**SANA_1600M_1024PX, "euler_at_final": True}, [20]),
    ("sana-no-lower-order-final", {**SANA_1600M_1024PX, "lower_order_final": False}, [5, 20]),
    ("sana-sde", {**SANA_1600M_1024PX, "algorithm_type": "sde-dpmsolver++"}, [1, 5, 16]),
    ("sana-sde-heun", {**SANA_1600M_1024PX, "algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, [6]),
    ("sana-sde-order3", {**SANA_1600M_1024PX, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, [6]),
    ("flow-shift-1", {**SANA_1600M_1024PX, "flow_shift": 1.0}, [10]),
]


@pytest.mark.parametrize(
    "config,steps",
    [(cfg, n) for _, cfg, all_steps in DPM_CASES for n in all_steps],
    ids=[f"{name}-{n}" for name, _, all_steps in DPM_CASES for n in all_steps],
)
def test_flow_dpmsolver_matches_diffusers(monkeypatch, config, steps):
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ours = make_sampler("flow_dpmpp", dict(theirs.config))
    theirs.set_timesteps(steps)  # SanaPipeline: num_inference_steps only
    ours.set_timesteps(steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    _close(ours.sigmas, theirs.sigmas.numpy())
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)
    assert ours.stochastic == (config["algorithm_type"] == "sde-dpmsolver++")

    def same_x0(mine, _):  # the x_0 the solver extrapolates from
        _close(mine.denoised, theirs.model_outputs[-1].numpy())

    _run_both(monkeypatch, "flow_dpmpp", ours, theirs, (2, 32, 8, 8), seed=steps, after_step=same_x0)


@pytest.mark.parametrize("steps", [1, 10])
def test_flow_dpmsolver_dynamic_shifting_matches_diffusers(monkeypatch, steps):
    config = {**SANA_1600M_1024PX, "use_dynamic_shifting": True}
    mu = calculate_shift(4096)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ours = make_sampler("flow_dpmpp", dict(theirs.config))
    theirs.set_timesteps(steps, mu=mu)
    ours.set_timesteps(steps, mu=mu)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    _close(ours.sigmas, theirs.sigmas.numpy())
    _run_both(monkeypatch, "flow_dpmpp", ours, theirs, (1, 32, 4, 4), seed=steps)


@pytest.mark.parametrize("begin", [0, 4, 9])
def test_flow_dpmsolver_add_noise_matches_diffusers(begin):
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(SANA_1600M_1024PX)
    ours = make_sampler("flow_dpmpp", dict(theirs.config))
    theirs.set_timesteps(10)
    ours.set_timesteps(10)
    theirs.set_begin_index(begin)
    ours.begin(begin)
    rng = np.random.default_rng(begin)
    x, noise = (rng.standard_normal((2, 32, 4, 4)).astype(np.float32) for _ in range(2))
    ref = theirs.add_noise(torch.from_numpy(x), torch.from_numpy(noise), theirs.timesteps[begin].repeat(2))
    _close(ours.add_noise(x, noise, ours.timesteps[begin]), ref.numpy())


# --- SCM (SANA-Sprint) ---------------------------------------------------------------------------------------
def _sprint_set_timesteps_kwargs(steps: int) -> dict:
    # SanaSprintPipeline's defaults (max_timesteps 1.5708, intermediate 1.3) hold for 2 steps; other step
    # counts need intermediate_timesteps=None, which diffusers otherwise refuses
    return {"intermediate_timesteps": 1.3 if steps == 2 else None}


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_scm_matches_diffusers(monkeypatch, steps):
    theirs = diffusers.SCMScheduler.from_config(SANA_SPRINT)
    ours = make_sampler("scm", dict(theirs.config))
    theirs.set_timesteps(steps, **_sprint_set_timesteps_kwargs(steps))
    ours.set_timesteps(steps)  # "auto": the same grids
    np.testing.assert_array_equal(ours.schedule_timesteps, theirs.timesteps.numpy())
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy()[:-1])  # what the pipeline iterates
    theirs.set_begin_index(0)  # as the pipeline
    outs = _run_both(monkeypatch, "scm", ours, theirs, (2, 32, 8, 8), seed=steps)
    for mine, ref in outs:
        _close(mine.denoised, ref.pred_original_sample.numpy())
    # the last angle is 0: the last step lands on its x_0 estimate, which the pipeline decodes
    np.testing.assert_array_equal(outs[-1][0].prev_sample, outs[-1][0].denoised)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_runs_the_sana_sprint_loop(monkeypatch, steps):
    """Our sampler's conversions around a flow transformer reproduce SanaSprintPipeline's denoising loop."""

    def velocity(x, s):  # a stand-in transformer: any smooth function of its input and flow time
        return np.tanh(x) * (1 + s) - 0.3 * x

    rng = np.random.default_rng(10 + steps)
    shape = (2, 32, 8, 8)
    start = rng.standard_normal(shape).astype(np.float32)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    patch_diffusers_noise(monkeypatch, diffusers.schedulers.scheduling_scm, noises)

    # diffusers' loop, as pipeline_sana_sprint.py writes it (guidance and text are the transformer's business)
    theirs = diffusers.SCMScheduler.from_config(SANA_SPRINT)
    theirs.set_timesteps(steps, **_sprint_set_timesteps_kwargs(steps))
    theirs.set_begin_index(0)
    sigma_data = theirs.config.sigma_data
    latents = torch.from_numpy(start.copy()) * sigma_data
    for t in theirs.timesteps[:-1]:
        timestep = t.expand(latents.shape[0])
        latents_model_input = latents / sigma_data
        scm_timestep = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = scm_timestep.view(-1, 1, 1, 1)
        latent_model_input = latents_model_input * torch.sqrt(s**2 + (1 - s) ** 2)
        noise_pred = torch.from_numpy(velocity(latent_model_input.numpy(), s.numpy()))
        noise_pred = ((1 - 2 * s) * latent_model_input + (1 - 2 * s + 2 * s**2) * noise_pred) / torch.sqrt(
            s**2 + (1 - s) ** 2
        )
        noise_pred = noise_pred.float() * sigma_data
        latents, denoised = theirs.step(noise_pred, timestep, latents, return_dict=False)
    reference = (denoised / sigma_data).numpy()

    # ours, through the sampler's API only
    ours = make_sampler("scm", SANA_SPRINT)
    ours.set_timesteps(steps)
    sample = start * np.float32(ours.init_noise_sigma)
    our_noise = ReplayNoise(noises)
    for t in ours.timesteps:
        model_in = ours.scale_model_input(sample, t)
        v = velocity(model_in, ours.model_timestep(t))
        sample = ours.step(ours.from_velocity(v, model_in, t), t, sample, noise=our_noise).prev_sample
    _close(ours.final_latents(sample), reference)


def test_scm_add_noise_matches_sana_sprint_img2img():
    """SanaSprintImg2ImgPipeline.prepare_latents: cos(t) image_latents + sin(t) noise, both in sigma_data units."""
    ours = make_sampler("scm", SANA_SPRINT)
    ours.set_timesteps(2)
    rng = np.random.default_rng(4)
    x, noise = (rng.standard_normal((2, 32, 4, 4)).astype(np.float32) for _ in range(2))
    for t in ours.timesteps:
        tt = torch.tensor([float(t)], dtype=torch.float32)
        ref = torch.cos(tt) * (torch.from_numpy(x) * 0.5) + torch.sin(tt) * (torch.from_numpy(noise) * 0.5)
        _close(ours.add_noise(x, noise, t), ref.numpy())


def test_scm_custom_timesteps_match_diffusers():
    theirs = diffusers.SCMScheduler.from_config(SANA_SPRINT)
    grid = [1.5708, 1.0, 0.5, 0.0]
    theirs.set_timesteps(3, timesteps=grid, max_timesteps=None, intermediate_timesteps=None)
    ours = make_sampler("scm", SANA_SPRINT)
    ours.set_timesteps(3, timesteps=grid)
    np.testing.assert_array_equal(ours.schedule_timesteps, theirs.timesteps.numpy())


# --- Wrong arguments are clear errors --------------------------------------------------------------------------
FLOW_CONFIGS = {"flow_euler": SD3_MEDIUM, "flow_dpmpp": SANA_1600M_1024PX, "scm": SANA_SPRINT}


@pytest.mark.parametrize("name", sorted(FLOW_CONFIGS))
def test_steps_below_one_is_an_error(name):
    sampler = make_sampler(name, FLOW_CONFIGS[name])
    for bad in (0, -1):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sampler.set_timesteps(bad)


def test_missing_mu_with_dynamic_shifting_is_an_error():
    sampler = make_sampler("flow_euler", FLUX1_DEV)
    with pytest.raises(ValueError, match="mu must be passed"):
        sampler.set_timesteps(sigmas=np.linspace(1.0, 0.25, 4))
    dpm = make_sampler("flow_dpmpp", {**SANA_1600M_1024PX, "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="mu must be passed"):
        dpm.set_timesteps(4)
    with pytest.raises(ValueError, match="mu is only accepted"):
        make_sampler("flow_dpmpp", SANA_1600M_1024PX).set_timesteps(4, mu=1.0)


def test_flow_euler_argument_errors():
    sampler = make_sampler("flow_euler", SD3_MEDIUM)
    with pytest.raises(ValueError, match="sigmas/timesteps given"):
        sampler.set_timesteps(4, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="num_inference_steps, sigmas or timesteps"):
        sampler.set_timesteps()
    # one step at sigma 1 has no span for shift_terminal to stretch: it stays (diffusers' sigmas are NaN there)
    one = make_sampler("flow_euler", LTX_VIDEO)
    one.set_timesteps(sigmas=[1.0], mu=1.0)
    np.testing.assert_array_equal(one.sigmas, [1.0, 0.0])
    sampler.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of this sampler's timesteps"):
        sampler.scale_noise(np.zeros((1, 1)), 123.0, np.zeros((1, 1)))


def test_scm_argument_errors():
    sampler = make_sampler("scm", SANA_SPRINT)
    with pytest.raises(ValueError, match="two steps only"):
        sampler.set_timesteps(4, intermediate_timesteps=1.3)
    with pytest.raises(ValueError, match="exceeds num_train_timesteps"):
        sampler.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps \\+ 1"):
        sampler.set_timesteps(2, timesteps=[1.5, 0.0])


@pytest.mark.parametrize(
    "name,config",
    [
        ("flow_euler", {**SD3_MEDIUM, "stochastic_sampling": True}),
        ("scm", SANA_SPRINT),
        ("flow_dpmpp", {**SANA_1600M_1024PX, "algorithm_type": "sde-dpmsolver++"}),
    ],
    ids=["flow_euler-stochastic", "scm", "flow_dpmpp-sde"],
)
def test_stochastic_flow_sampler_without_noise_is_a_clear_error(name, config):
    sampler = make_sampler(name, config)
    sampler.set_timesteps(2)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="noise source"):
        sampler.step(x, sampler.timesteps[0], x)


@pytest.mark.parametrize(
    "config,match",
    [
        ({**SD3_MEDIUM, "use_beta_sigmas": True}, "use_beta_sigmas=True is not supported"),
        ({**SD3_MEDIUM, "use_karras_sigmas": True, "use_exponential_sigmas": True}, "only one of"),
        ({**SD3_MEDIUM, "time_shift_type": "cubic"}, "time_shift_type"),
        ({**SANA_1600M_1024PX, "thresholding": True}, "thresholding=True is not supported"),
        ({**SANA_1600M_1024PX, "final_sigmas_type": "sigma_min"}, "final_sigmas_type"),
        ({**SANA_1600M_1024PX, "algorithm_type": "dpmsolver"}, "algorithm_type"),
    ],
)
def test_unsupported_settings_are_clear_errors(config, match):
    with pytest.raises(ValueError, match=match):
        FlowScheduleConfig.from_dict(config)


# --- UNets cannot get a flow sampler (nor flow models a diffusion one) -------------------------------------------
def test_flow_samplers_refuse_diffusion_configs():
    recorded_sd15 = ScheduleConfig.from_dict(SD15).to_dict()  # what an SD 1.5 bundle's manifest holds
    for name in FLOW_CONFIGS:
        with pytest.raises(ValueError, match="diffusion model"):
            make_sampler(name, recorded_sd15)
        with pytest.raises(ValueError, match="takes a FlowScheduleConfig"):
            make_sampler(name, ScheduleConfig.from_dict(SD15))
    with pytest.raises(ValueError, match="diffusion model"):
        make_sampler("flow_dpmpp", PIXART_SIGMA)
    with pytest.raises(ValueError, match="use_flow_sigmas=True"):
        make_sampler("flow_dpmpp", {**SANA_1600M_1024PX, "use_flow_sigmas": False})
    with pytest.raises(ValueError, match="trigflow"):
        make_sampler("flow_euler", SANA_SPRINT)  # SCM's model is not a plain velocity model
    # configs that omit prediction_type mean diffusers' class default: epsilon for DPM-Solver, trigflow for SCM
    omitted = {k: v for k, v in SANA_1600M_1024PX.items() if k != "prediction_type"}
    with pytest.raises(ValueError, match="diffusion model"):
        make_sampler("flow_dpmpp", omitted)
    assert make_sampler("scm", {"sigma_data": 0.5}).config.prediction_type == "trigflow"


def test_diffusion_samplers_refuse_flow_configs():
    recorded_sana = FlowScheduleConfig.from_dict(SANA_1600M_1024PX).to_dict()
    for name in ("euler", "euler_ancestral", "ddim", "lcm", "tcd"):
        with pytest.raises(ValueError, match="flow-matching model"):
            make_sampler(name, recorded_sana)


def test_check_sampler_fits_by_kind():
    for name, cls in SAMPLERS.items():
        for prediction in ("epsilon", "v_prediction", "sample", "flow_prediction", "trigflow"):
            if prediction in cls.predictions:
                check_sampler_fits(name, prediction)
            else:
                with pytest.raises(ValueError, match="cannot drive"):
                    check_sampler_fits(name, prediction)
    assert {n for n, c in SAMPLERS.items() if c.kind == "flow"} == {"flow_euler", "flow_dpmpp", "scm"}
    assert all(
        c.kind == "diffusion" for n, c in SAMPLERS.items() if n in ("euler", "euler_ancestral", "ddim", "lcm", "tcd")
    )
    with pytest.raises(ValueError, match="samplers for it: euler"):
        make_sampler("flow_euler", SD3_MEDIUM, prediction_type="epsilon")
    with pytest.raises(ValueError, match="flow_euler, flow_dpmpp"):
        make_sampler("euler", SD15, prediction_type="flow_prediction")
    make_sampler("flow_dpmpp", SANA_1600M_1024PX, prediction_type="flow_prediction")


# --- Registry: export records them by diffusers' class name ------------------------------------------------------
PUBLISHED = [
    ("FlowMatchEulerDiscreteScheduler", SD3_MEDIUM, "flow_euler"),
    ("FlowMatchEulerDiscreteScheduler", FLUX1_DEV, "flow_euler"),
    ("DPMSolverMultistepScheduler", SANA_1600M_1024PX, "flow_dpmpp"),
    ("SCMScheduler", SANA_SPRINT, "scm"),
    ("DPMSolverMultistepScheduler", PIXART_SIGMA, "dpmpp"),  # a VP model: the diffusion form, whatever the class
    (
        "DPMSolverMultistepScheduler",
        {**PIXART_SIGMA, "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
        None,
    ),
]


@pytest.mark.parametrize("class_name,config,expected", PUBLISHED, ids=[f"{c}-{e}" for c, _, e in PUBLISHED])
def test_sampler_for_scheduler(class_name, config, expected):
    resolved = dict(getattr(diffusers, class_name).from_config(config).config)
    assert sampler_for_scheduler(class_name, resolved) == expected
    if expected is not None:
        assert SAMPLER_TO_DIFFUSERS_CLASS[expected] == class_name
        # a bundle records config_class(resolved).to_dict(); the sampler rebuilt from it is the same one
        recorded = SAMPLERS[expected].config_class.from_dict(resolved).to_dict()
        a, b = make_sampler(expected, resolved), make_sampler(expected, recorded)
        kwargs = {"mu": calculate_shift(4096)} if config.get("use_dynamic_shifting") else {}
        a.set_timesteps(4, **kwargs)
        b.set_timesteps(4, **kwargs)
        np.testing.assert_array_equal(a.timesteps, b.timesteps)


def test_every_sampler_has_a_diffusers_class():
    assert set(SAMPLER_TO_DIFFUSERS_CLASS) == set(SAMPLERS)
    for name, class_name in SAMPLER_TO_DIFFUSERS_CLASS.items():
        assert hasattr(diffusers, class_name), class_name
        if class_name in DIFFUSERS_CLASS_TO_SAMPLER:
            assert DIFFUSERS_CLASS_TO_SAMPLER[class_name] == name
    # the ambiguous class stays out of the by-name table: it would send PixArt-Sigma or SD to a flow sampler
    assert "DPMSolverMultistepScheduler" not in DIFFUSERS_CLASS_TO_SAMPLER


@pytest.mark.parametrize("module", ["flow_euler", "flow_dpmsolver", "scm"])
def test_sampler_files_start_with_their_paper(module):
    doc = inspect.getmodule(getattr(schedulers, module)).__doc__
    assert "https://arxiv.org/abs/" in doc.split("\n\n")[1]
