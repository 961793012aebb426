"""The export's memory estimate (export/memory_plan.py): weights counted from the files as they will be
loaded, and a model that cannot fit refused before it is loaded, with nothing left at the output."""

import numpy as np
import pytest
from tiny_models import tiny_source

pytest.importorskip("torch")


def test_component_bytes_are_the_loaded_fp32_weights(models_root):
    from diffusers import UNet2DConditionModel

    from edgediff.export.memory_plan import component_bytes

    folder = tiny_source("tiny-sd1", models_root) / "unet"
    unet = UNet2DConditionModel.from_pretrained(folder)
    assert component_bytes(folder) == sum(t.numel() * 4 for t in unet.state_dict().values())


def test_half_precision_files_count_as_fp32(tmp_path):
    from safetensors.numpy import save_file

    from edgediff.export.memory_plan import component_bytes

    save_file({"w": np.zeros((10, 20), np.float16), "step": np.zeros(3, np.int64)}, tmp_path / "model.safetensors")
    assert component_bytes(tmp_path) == 10 * 20 * 4 + 3 * 8


def test_variants_beside_the_weights_are_not_counted(tmp_path):
    """diffusers loads diffusion_pytorch_model.safetensors, not the .non_ema / .fp16 variants beside it."""
    from safetensors.numpy import save_file

    from edgediff.export.memory_plan import component_bytes

    save_file({"w": np.zeros(100, np.float32)}, tmp_path / "diffusion_pytorch_model.safetensors")
    save_file({"w": np.zeros(100, np.float32)}, tmp_path / "diffusion_pytorch_model.non_ema.safetensors")
    save_file({"w": np.zeros(100, np.float16)}, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
    assert component_bytes(tmp_path) == 400


def test_stages_free_each_component_after_its_export():
    from edgediff.export.memory_plan import BASE_BYTES, EXPORT_COPIES, export_stages

    stages = {s.name: s.bytes for s in export_stages({"unet": 300, "vae": 100}, quantised=False)}
    assert list(stages) == ["loading the source", "vae: export", "unet: export"]  # smallest first
    assert stages["unet: export"] == BASE_BYTES + 300 + int(EXPORT_COPIES * 300)  # the VAE's weights freed
    assert "recording calibration inputs" in {s.name for s in export_stages({"unet": 1}, quantised=True)}


def test_a_model_that_cannot_fit_is_refused_before_loading(models_root, tmp_path, monkeypatch):
    from edgediff.export import export_bundle, memory_plan
    from edgediff.runtime.errors import ExportError

    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 1_000_000)
    loaded = []
    monkeypatch.setattr("edgediff.export.source.load_pipeline", lambda *a, **k: loaded.append(1))
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match=r"needs about .* GiB at its peak \(\w+: export\).*0\.0 GiB of memory"):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), out, progress=False)
    assert not loaded and not out.exists()
    monkeypatch.setenv(memory_plan.IGNORE_ENV, "1")  # the user's override: the estimate is not checked
    assert memory_plan.check_source(str(tiny_source("tiny-sd1", models_root)))


def test_sd3_advice_names_no_t5_and_no_t5_leaves_it_out(models_root, monkeypatch):
    from edgediff.export import memory_plan
    from edgediff.runtime.errors import ExportError

    source = str(tiny_source("tiny-sd3", models_root))
    with_t5 = {s.name for s in memory_plan.check_source(source)}
    without = {s.name for s in memory_plan.check_source(source, t5=False)}
    assert "text_encoder_3: export" in with_t5 and "text_encoder_3: export" not in without
    monkeypatch.setattr(memory_plan, "available_bytes", lambda: 1)
    with pytest.raises(ExportError, match="--no-t5"):
        memory_plan.check_source(source)
