"""random_init's sources for the architectures published in 16-bit floats: built a component at a time, each
in the stored dtype, so that SD3.5-medium's T5-XXL and transformer are never held together, nor in fp32."""

import gc
import json
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def test_a_half_precision_architecture_is_saved_one_model_at_a_time_in_its_stored_dtype(tmp_path, monkeypatch):
    from safetensors import safe_open

    import edgediff.models.random_init as random_init

    monkeypatch.setitem(random_init.ARCHS, "tiny-sd3-bf16", dict(random_init.ARCHS["tiny-sd3"], stored="bfloat16"))
    made, alive_at_make = [], []
    real_made_like = random_init._made_like

    def spy(meta_module):
        gc.collect()
        alive_at_make.append(sum(ref() is not None for ref in made))
        assert torch.get_default_dtype() == torch.bfloat16  # parameters are never made in fp32 first
        model = real_made_like(meta_module)
        made.append(weakref.ref(model))
        return model

    monkeypatch.setattr(random_init, "_made_like", spy)
    out = random_init.build_random_pipeline("tiny-sd3-bf16", tmp_path / "src")

    models = ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae")
    assert len(made) == len(models) and alive_at_make == [0] * len(models)
    assert torch.get_default_dtype() == torch.float32
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["transformer"][1] == "SD3Transformer2DModel"
    assert not any(p.name.startswith("_tokenizer") for p in out.iterdir())  # the tokenizer sources are gone
    for name in models:
        for file in (out / name).glob("*.safetensors"):
            with safe_open(file, "pt") as weights:
                assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}

    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(out, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all() and image.std() > 0


@pytest.mark.parametrize("arch,channels", [("taesd", 4), ("taesd3", 16)])
def test_a_random_tiny_autoencoder_takes_its_family_latents(tmp_path, arch, channels):
    """TAESD decodes SD's 4 latent channels, TAESD3 SD3's (and FLUX's) 16: the exporter loads each for a model of
    its width and refuses it for the other."""
    from edgediff.export.tiny_decoder import load_tiny_decoder
    from edgediff.models.random_init import build_random_taesd
    from edgediff.runtime.errors import ExportError

    folder = build_random_taesd(tmp_path / arch, arch=arch)
    tiny = load_tiny_decoder(str(folder), channels)
    assert tiny.config.latent_channels == channels and tiny.config.scaling_factor == 1.0
    with torch.no_grad():
        decoded = tiny.decode(torch.zeros(1, channels, 8, 8)).sample
    assert decoded.shape == (1, 3, 64, 64)
    with pytest.raises(ExportError, match=f"takes {channels} latent channels, the model makes {20 - channels}"):
        load_tiny_decoder(str(folder), 20 - channels)
