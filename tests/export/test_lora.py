"""A LoRA fused at export gives the image diffusers gives with the LoRA loaded."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from references import (
    PIXEL_ATOL,  # noqa: E402
    reference_pipeline,  # noqa: E402
)
from tiny_models import tiny_source  # noqa: E402

from edgediff.export import export_bundle  # noqa: E402
from edgediff.export.lora import parse_lora  # noqa: E402
from edgediff.runtime import Bundle, Pipeline  # noqa: E402
from edgediff.runtime.errors import ExportError  # noqa: E402

SCALE = 0.7


def _random_lora(models_root, arch: str):
    """A UNet LoRA with random weights for `arch`, saved as diffusers saves LoRAs."""
    from peft import LoraConfig, get_peft_model_state_dict

    from edgediff.export.source import load_pipeline

    pipe = load_pipeline(str(tiny_source(arch, models_root)))
    torch.manual_seed(0)
    # init_lora_weights=False: random A and B, so the adapter changes the output from the start
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    out = models_root / f"random-lora-{arch}"
    type(pipe).save_lora_weights(out, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    return out / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sdxl"])
def test_fused_lora_matches_diffusers_with_the_lora_loaded(models_root, tmp_path, monkeypatch, arch):
    random_lora = _random_lora(models_root, arch)
    source = str(tiny_source(arch, models_root))
    bundle = export_bundle(source, tmp_path / "with-lora", loras=[(str(random_lora), SCALE)], progress=False)
    record = Bundle.open(bundle).manifest.provenance["loras"]
    assert record == [{"file": random_lora.name, "scale": SCALE, "sha256": record[0]["sha256"]}]
    assert len(record[0]["sha256"]) == 64

    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    m = pipe.manifest
    latents = (
        np.random.default_rng(0)
        .standard_normal(
            (
                1,
                m.latent_channels,
                m.defaults["height"] // m.vae_scale_factor,
                m.defaults["width"] // m.vae_scale_factor,
            )
        )
        .astype(np.float32)
    )
    ours = pipe("a red circle", latents=latents, num_inference_steps=2, output_type="np").images

    ref = reference_pipeline("text2img", source, m, m.scheduler["name"], [], monkeypatch)
    ref.load_lora_weights(str(random_lora))
    theirs = ref(
        "a red circle",
        latents=torch.from_numpy(latents),
        num_inference_steps=2,
        output_type="np",
        cross_attention_kwargs={"scale": SCALE},
    ).images
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    plain = Pipeline.from_bundle(export_bundle(source, tmp_path / "plain", progress=False), provider="cpu")(
        "a red circle", latents=latents, num_inference_steps=2, output_type="np"
    ).images
    assert np.abs(ours - plain).max() > PIXEL_ATOL  # the LoRA really changed the model


def test_lora_arguments(tmp_path, models_root):
    assert parse_lora("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_lora("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_lora("C:\\loras\\x.safetensors") == ("C:\\loras\\x.safetensors", 1.0)
    assert parse_lora("C:\\loras\\x.safetensors:2") == ("C:\\loras\\x.safetensors", 2.0)
    with pytest.raises(ExportError, match="LoRA file not found"):
        export_bundle(
            str(tiny_source("tiny-sd1", models_root)), tmp_path / "x", loras=[("nope.safetensors", 1.0)], progress=False
        )
    assert not (tmp_path / "x").exists()
