"""A few steps of every stage of the flow-matching (SD3-family) model's training, then its export: the assembled
StableDiffusion3Pipeline folder loads in diffusers, exports with edgediff (T5 included), and the bundle draws what
diffusers draws from the same latents."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PIXEL_ATOL  # noqa: E402
from replay_noise import ReplayNoise, patch_diffusers_noise  # noqa: E402

PROMPT = "a large red circle at the left on a blue background"


@pytest.fixture
def one_thread():
    """The smoke run's tensors are tiny: a second thread only adds synchronisation, and on a busy machine it made
    this test three times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_flow_stage_runs_resumes_and_assembles_an_exportable_sd3_model(tmp_path, one_thread, monkeypatch):
    from edgediff.export import export_bundle
    from edgediff.runtime import Pipeline
    from edgediff.runtime.schedulers import make_sampler
    from training.flow import STAGES, run_stages, smoke_config

    cfg = smoke_config()
    run = tmp_path / "run"
    run_stages(STAGES, run, cfg)
    assert all((run / f"{s}.done").exists() for s in STAGES)
    assert all((run / stage / "ckpt.pt").exists() for stage in ("teacher", "distill", "adversarial"))
    assert (run / "adversarial" / "transformer" / "config.json").exists()
    assert len(list((run / "pairs").glob("chunk_*.npz"))) == 2  # 6 pairs in chunks of 4
    # resuming a finished stage from its checkpoint does no more steps and still writes its outputs
    (run / "distill.done").unlink()
    run_stages(["distill"], run, cfg)
    assert (run / "distill" / "transformer" / "config.json").exists()

    _assert_pairs_are_the_teacher_pipelines_samples(run, cfg)
    _assert_adversarial_samples_are_the_student_pipelines(run, cfg, monkeypatch)

    source = run / "assembled" / "student"
    bundle = export_bundle(str(source), tmp_path / "bundle", progress=False, default_steps=1, default_guidance=0.0)
    pipe = Pipeline.from_bundle(bundle, provider="cpu", threads=1)
    m = pipe.manifest
    assert m.denoiser == "transformer" and m.latent_channels == 4 and m.conditioning["t5"]
    assert (m.vae_scale_factor, m.vae_shift_factor) == (4, 0.0)
    # the bundle takes T5's length from its tokenizer (trained at cfg.t5_length, not the pipeline's 256)
    assert m.conditioning["max_sequence_length"] == cfg.t5_length
    # the student's sampler: its default steps re-noised, on 1 -> second_sigma -> 0
    sampler = make_sampler(m.scheduler["name"], m.scheduler["config"], m.prediction_type)
    sampler.set_timesteps(cfg.default_steps)
    assert sampler.stochastic
    np.testing.assert_allclose(sampler.sigmas, [1.0, cfg.second_sigma, 0.0], atol=1e-6)
    call = dict(num_inference_steps=1, guidance_scale=0.0, max_sequence_length=cfg.t5_length)
    image = pipe(PROMPT, seed=0, output_type="np", **call).images
    assert image.shape == (1, cfg.image_size, cfg.image_size, 3) and np.isfinite(image).all()
    assert np.array_equal(
        pipe(PROMPT, seed=0, output_type="np", num_inference_steps=1, guidance_scale=0.0).images, image
    )

    # diffusers on the assembled folder and the bundle, from the same latents (as tests/export/test_sd3.py) and, at
    # the default steps, the same re-noising noise (one draw per step on each side)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    reference = diffusers.StableDiffusion3Pipeline.from_pretrained(str(source))
    reference.set_progress_bar_config(disable=True)
    for steps in (1, cfg.default_steps):
        # one step runs at sigma 1 alone, which shift_terminal cannot stretch (diffusers' sigmas are NaN there)
        config = {**m.scheduler["config"], **({"shift_terminal": None} if steps == 1 else {})}
        reference.scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(config)
        call = dict(num_inference_steps=steps, guidance_scale=0.0, max_sequence_length=cfg.t5_length)
        noises = [rng.standard_normal(latents.shape).astype(np.float32) for _ in range(steps)]
        ours = pipe(PROMPT, latents=latents, output_type="np", generator=ReplayNoise(noises), **call).images
        scheduler_module = diffusers.schedulers.scheduling_flow_match_euler_discrete
        patch_diffusers_noise(monkeypatch, scheduler_module, noises)
        theirs = reference(PROMPT, latents=torch.from_numpy(latents), output_type="np", **call).images
        assert ours.shape == theirs.shape == (1, cfg.image_size, cfg.image_size, 3)
        assert np.abs(ours - theirs).max() <= PIXEL_ATOL, steps


def _assert_pairs_are_the_teacher_pipelines_samples(run, cfg):
    """A reflow pair's end is what the assembled teacher pipeline draws from its noise, prompt and guidance."""
    chunk = np.load(run / "pairs" / "chunk_00000.npz")
    teacher = diffusers.StableDiffusion3Pipeline.from_pretrained(str(run / "assembled" / "teacher"))
    teacher.set_progress_bar_config(disable=True)
    latents = teacher(
        str(chunk["captions"][0]),
        latents=torch.from_numpy(chunk["noise"][:1]),
        num_inference_steps=cfg.pair_steps,
        guidance_scale=cfg.guidance,
        max_sequence_length=cfg.t5_length,
        output_type="latent",
    ).images
    np.testing.assert_allclose(latents.numpy(), chunk["x0"][:1], atol=1e-4)


def test_flow_targets_agree_with_the_runtime_parametrisation():
    """What the teacher and the student learn to output (flow.flow_path) turns back into the same x_0 and noise
    through the runtime's flow parametrisation, the one-step end t = 1 included."""
    from edgediff.runtime.schedulers.parametrization import flow_x0_eps
    from training.flow import flow_path

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    t = torch.tensor([0.001, 0.5, 1.0])
    x_t, velocity = flow_path(x0, noise, t)
    for i in range(3):
        x0_rt, eps_rt = flow_x0_eps(velocity[i].numpy(), x_t[i].numpy(), t[i].item())
        np.testing.assert_allclose(x0_rt, x0[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(eps_rt, noise[i].numpy(), atol=1e-5)


def _assert_adversarial_samples_are_the_student_pipelines(run, cfg, monkeypatch):
    """The adversarial stage judges what the assembled student pipeline draws: its two steps from the same noise, the
    second re-noised with the same fresh noise, end on the pipeline's latents."""
    from training.flow_adversarial import student_two_steps

    student = diffusers.StableDiffusion3Pipeline.from_pretrained(str(run / "assembled" / "student"))
    student.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(1)
    noise, fresh, unused = (rng.standard_normal((1, 4, 16, 16)).astype(np.float32) for _ in range(3))
    patch_diffusers_noise(monkeypatch, diffusers.schedulers.scheduling_flow_match_euler_discrete, [fresh, unused])
    call = dict(guidance_scale=0.0, max_sequence_length=cfg.t5_length)
    theirs = student(PROMPT, latents=torch.from_numpy(noise), num_inference_steps=2, output_type="latent", **call)
    cond, _, pooled, _ = student.encode_prompt(
        PROMPT, None, None, do_classifier_free_guidance=False, max_sequence_length=cfg.t5_length
    )
    with torch.no_grad():
        _, ours = student_two_steps(
            student.transformer, torch.from_numpy(noise), cond, pooled, cfg.second_sigma, torch.from_numpy(fresh)
        )
    np.testing.assert_allclose(ours.numpy(), theirs.images.numpy(), atol=1e-5)
