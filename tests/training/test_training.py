"""A few steps of every training stage, so that the scripts stay alive (CI never trains for real)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_every_stage_runs_resumes_and_assembles_an_exportable_model(tmp_path):
    from edgediff.export import export_bundle
    from edgediff.runtime import Pipeline
    from training.train import STAGES, run_stages, smoke_config

    cfg = smoke_config()
    run = tmp_path / "run"
    run_stages(STAGES, run, cfg)
    assert all((run / f"{s}.done").exists() for s in STAGES)
    for stage in ("vae", "teacher", "distill", "decoder", "tiny"):
        assert (run / stage / "ckpt.pt").exists()
    _assert_decoder_fine_tune_kept_the_encoder(run)
    # resuming a finished stage from its checkpoint does no more steps and still writes its outputs
    (run / "distill.done").unlink()
    run_stages(["distill"], run, cfg)
    assert (run / "distill" / "unet" / "config.json").exists()

    bundle = export_bundle(str(run / "assembled" / "student"), tmp_path / "bundle", progress=False)
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.manifest.family == "lcm-sd1" and pipe.manifest.tokenizer["max_length"] == cfg.max_length
    image = pipe("a large red circle on a blue background", num_inference_steps=2, seed=0).images[0]
    assert image.size == (cfg.image_size, cfg.image_size)


def _assert_decoder_fine_tune_kept_the_encoder(run):
    """The decoder stage trains the decoder alone: the encoder (the latent space the UNets learnt) is the VAE
    stage's, bit for bit, while the decoder moved; the assembled pipelines carry the fine-tuned VAE."""
    import torch
    from diffusers import AutoencoderKL

    before, after = (AutoencoderKL.from_pretrained(run / d / "final").state_dict() for d in ("vae", "decoder"))
    assembled = AutoencoderKL.from_pretrained(run / "assembled" / "student" / "vae").state_dict()
    for name, weight in before.items():
        if name.startswith(("encoder.", "quant_conv.")):
            assert torch.equal(weight, after[name]), name
    assert any(not torch.equal(w, after[n]) for n, w in before.items() if n.startswith("decoder."))
    assert all(torch.equal(w, assembled[n]) for n, w in after.items())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_targets_agree_with_the_runtime_parametrisation(prediction_type):
    """What the teacher learns to output (train._target) turns back into the same x_0 and noise through the
    runtime's sampler-side parametrisation, at every kind of timestep, the zero-SNR last one included."""
    import numpy as np
    import torch

    from edgediff.runtime.schedulers.parametrization import predict_x0_eps
    from training.shipped_config import ShippedConfig
    from training.train import _alphas, _target, _x0_eps

    cfg = ShippedConfig()
    cfg.scheduler = {
        **cfg.scheduler,
        "prediction_type": prediction_type,
        "rescale_betas_zero_snr": prediction_type == "v_prediction",
    }
    alphas = _alphas(cfg)
    z, noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999 if prediction_type == "v_prediction" else 998])
    a = alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * z + (1 - a).sqrt() * noise
    out = _target(z, noise, a, cfg)
    x0, eps = _x0_eps(out, x_t, a, cfg)
    torch.testing.assert_close(x0, z, atol=1e-3, rtol=0)
    torch.testing.assert_close(eps, noise, atol=1e-3, rtol=0)
    for i in range(3):
        x0_rt, eps_rt = predict_x0_eps(prediction_type, out[i].numpy(), x_t[i].numpy(), alphas[t[i]].item())
        np.testing.assert_allclose(x0_rt, x0[i].numpy(), atol=1e-5)
        np.testing.assert_allclose(eps_rt, eps[i].numpy(), atol=1e-5)


def test_consistency_pairs_reach_the_boundary_where_the_target_is_the_teachers_step():
    """LCD's pairs cover LCM's whole 50-step grid, one skip apart, and the first ends at s = 0, where the boundary
    scalings make the target exactly the teacher's DDIM step (c_skip = 1, c_out = 0): the chain's anchor."""
    import numpy as np

    from training.shipped_config import ShippedConfig
    from training.train import _boundary, _lcd_pairs

    cfg = ShippedConfig()
    t, s = _lcd_pairs(np.random.default_rng(0), 20000, cfg)
    k = cfg.skip_steps
    assert set(t.tolist()) == set(range(k - 1, 1000, k))  # 19, 39, ..., 999: all 50, the first included
    assert ((t - s) == k).logical_or(s == 0).all() and s.min() == 0
    c_skip, c_out = _boundary(s[s == 0][:1], cfg)
    assert c_skip.item() == 1.0 and c_out.item() == 0.0
    c_skip, c_out = _boundary(t[t == k - 1][:1], cfg)
    assert c_skip.item() < 1e-3 and c_out.item() > 0.999  # one skip later the student's x_0 is the output
