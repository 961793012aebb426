"""Each numpy sampler against its diffusers scheduler, step by step, on the same model outputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402
from scheduler_configs import LCM_DREAMSHAPER_V7, SD15, SD21, SD_TURBO  # noqa: E402

from edgediff.runtime.schedulers import make_sampler  # noqa: E402

SAMPLER_ATOL = 1e-5  # the required bound between our sampler and diffusers' on identical inputs
SAMPLER_RTOL = 1e-6  # float32 rounding on latents of magnitude ~15 (Euler's first sigma)

DIFFUSERS = {
    "euler": ("EulerDiscreteScheduler", "scheduling_euler_discrete"),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", "scheduling_euler_ancestral_discrete"),
    "ddim": ("DDIMScheduler", "scheduling_ddim"),
    "lcm": ("LCMScheduler", "scheduling_lcm"),
    "tcd": ("TCDScheduler", "scheduling_tcd"),
}

CASES = [
    ("sd-turbo", SD_TURBO, "euler", [1, 2, 4]),
    ("sd-turbo", SD_TURBO, "euler_ancestral", [1, 4]),
    ("sd15", SD15, "euler", [25]),
    ("sd15", SD15, "euler_ancestral", [8]),
    ("sd15", SD15, "ddim", [1, 20]),
    ("sd15-karras", {**SD15, "use_karras_sigmas": True}, "euler", [10]),
    ("sd21-v", SD21, "ddim", [4, 25]),
    ("sd21-v", SD21, "euler", [10]),
    ("sd21-v-trailing", {**SD21, "timestep_spacing": "trailing"}, "euler_ancestral", [4]),
    ("sd21-v-zsnr", {**SD21, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, "ddim", [6]),
    ("lcm-dreamshaper-v7", LCM_DREAMSHAPER_V7, "lcm", [1, 2, 4, 8]),
    ("lcm-dreamshaper-v7", LCM_DREAMSHAPER_V7, "tcd", [1, 4]),
    ("lcm-v", {**LCM_DREAMSHAPER_V7, "prediction_type": "v_prediction"}, "lcm", [4]),
]


def _ids():
    return [f"{name}-{sampler}-{steps}" for name, _, sampler, all_steps in CASES for steps in all_steps]


@pytest.mark.parametrize(
    "config,sampler_name,steps",
    [(cfg, s, n) for _, cfg, s, all_steps in CASES for n in all_steps],
    ids=_ids(),
)
def test_sampler_matches_diffusers(monkeypatch, config, sampler_name, steps):
    cls_name, module_name = DIFFUSERS[sampler_name]
    module = getattr(diffusers.schedulers, module_name)
    theirs = getattr(diffusers, cls_name).from_config(config)
    ours = make_sampler(sampler_name, dict(theirs.config))  # the export records the resolved config like this

    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    np.testing.assert_allclose(ours.timesteps, theirs.timesteps.numpy(), atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL)
    assert float(ours.init_noise_sigma) == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)

    rng = np.random.default_rng(steps)
    shape = (2, 4, 8, 8)
    noises = [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)]
    patch_diffusers_noise(monkeypatch, module, noises)
    our_noise = ReplayNoise(noises)

    sample = rng.standard_normal(shape).astype(np.float32) * np.float32(theirs.init_noise_sigma)
    theirs_sample = torch.from_numpy(sample.copy())
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        np.testing.assert_allclose(
            ours.scale_model_input(sample, t_ours),
            theirs.scale_model_input(theirs_sample, t_theirs).numpy(),
            atol=SAMPLER_ATOL,
            rtol=SAMPLER_RTOL,
        )
        model_output = rng.standard_normal(shape).astype(np.float32)
        ours_out = ours.step(model_output, t_ours, sample, noise=our_noise)
        theirs_out = theirs.step(torch.from_numpy(model_output), t_theirs, theirs_sample)
        np.testing.assert_allclose(
            ours_out.prev_sample, theirs_out.prev_sample.numpy(), atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL
        )
        sample, theirs_sample = ours_out.prev_sample, theirs_out.prev_sample
    if sampler_name == "lcm":
        np.testing.assert_allclose(ours_out.denoised, theirs_out.denoised.numpy(), atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "ddim", "lcm", "tcd"])
def test_steps_below_one_is_an_error(name):
    sampler = make_sampler(name, SD15)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sampler.set_timesteps(0)


def test_stochastic_sampler_without_noise_is_a_clear_error():
    sampler = make_sampler("euler_ancestral", SD_TURBO)
    sampler.set_timesteps(2)
    x = np.zeros((1, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match="noise source"):
        sampler.step(x, sampler.timesteps[0], x)


def test_unknown_sampler_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown sampler 'pndm'"):
        make_sampler("pndm", SD15)


@pytest.mark.parametrize("sampler_name", ["ddim", "lcm"])
def test_clip_sample_matches_diffusers(monkeypatch, sampler_name):
    config = {**LCM_DREAMSHAPER_V7, "clip_sample": True, "clip_sample_range": 0.5}
    cls_name, module_name = DIFFUSERS[sampler_name]
    theirs = getattr(diffusers, cls_name).from_config(config)
    ours = make_sampler(sampler_name, dict(theirs.config))
    theirs.set_timesteps(2)
    ours.set_timesteps(2)
    rng = np.random.default_rng(3)
    noises = [rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for _ in range(2)]
    patch_diffusers_noise(monkeypatch, getattr(diffusers.schedulers, module_name), noises)
    sample = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    out = rng.standard_normal((1, 4, 4, 4)).astype(np.float32) * 3
    t = ours.timesteps[0]
    mine = ours.step(out, t, sample, noise=ReplayNoise(noises)).prev_sample
    ref = theirs.step(torch.from_numpy(out), theirs.timesteps[0], torch.from_numpy(sample)).prev_sample.numpy()
    np.testing.assert_allclose(mine, ref, atol=SAMPLER_ATOL, rtol=SAMPLER_RTOL)
