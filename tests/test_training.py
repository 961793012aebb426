"""A few steps of every training stage, so that the scripts stay alive (CI never trains for real)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")


def test_every_stage_runs_resumes_and_assembles_an_exportable_model(tmp_path):
    from edgediff.export import export_bundle
    from edgediff.models.train import STAGES, run_stages, smoke_config
    from edgediff.runtime import Pipeline

    cfg = smoke_config()
    run = tmp_path / "run"
    run_stages(STAGES, run, cfg)
    assert all((run / f"{s}.done").exists() for s in STAGES)
    for stage in ("vae", "teacher", "distill", "tiny"):
        assert (run / stage / "ckpt.pt").exists()
    # resuming a finished stage from its checkpoint does no more steps and still writes its outputs
    (run / "distill.done").unlink()
    run_stages(["distill"], run, cfg)
    assert (run / "distill" / "unet" / "config.json").exists()

    bundle = export_bundle(str(run / "assembled" / "student"), tmp_path / "bundle", progress=False)
    pipe = Pipeline.from_bundle(bundle)
    assert pipe.manifest.family == "lcm-sd1" and pipe.manifest.tokenizer["max_length"] == cfg.max_length
    image = pipe("a large red circle on a blue background", num_inference_steps=2, seed=0).images[0]
    assert image.size == (cfg.image_size, cfg.image_size)
