"""T5 and Gemma-2 overflow fp16 in their large sizes: whichever component holds one (FLUX's text_encoder_2, SANA's
text_encoder; SD3's text_encoder_3 and PixArt's text_encoder by the same rule) is kept fp32 in an fp16 bundle, with
the reason in the manifest, when its activations pass fp16's range in PyTorch (onnxruntime's CPU provider runs such
graphs partly in fp32, so their check here would pass); the rest of the bundle stays fp16, and so does an encoder
whose activations fit."""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from tiny_models import TINY_SIZE, tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, Pipeline  # noqa: E402

OVERFLOW_GAIN = 1e5  # activations of order 1 times this pass fp16's 65504


def _overflow(encoder) -> None:
    """Makes the last layer's residual stream pass fp16's range: T5's feed-forward output projection (as in the
    large T5s), Gemma-2's norm after its feed-forward (its own projection's output is normalised in fp32)."""
    with torch.no_grad():
        if type(encoder).__name__ == "T5EncoderModel":
            encoder.encoder.block[-1].layer[-1].DenseReluDense.wo.weight.mul_(OVERFLOW_GAIN)
        else:
            encoder.layers[-1].post_feedforward_layernorm.weight.fill_(OVERFLOW_GAIN)


@pytest.mark.parametrize(
    "arch, component",
    [("tiny-flux-schnell", "text_encoder_2"), ("tiny-sana", "text_encoder")],
    ids=["flux-t5", "sana-gemma2"],
)
def test_an_overflowing_text_encoder_is_kept_fp32_in_an_fp16_bundle(models_root, tmp_path, arch, component):
    import transformers

    from edgediff.export import export_bundle

    source = tmp_path / "src"
    shutil.copytree(tiny_source(arch, models_root), source)
    (architecture,) = transformers.AutoConfig.from_pretrained(source / component).architectures
    assert architecture in ("T5EncoderModel", "Gemma2Model")
    encoder = getattr(transformers, architecture).from_pretrained(source / component)
    _overflow(encoder)
    encoder.save_pretrained(source / component)

    size = TINY_SIZE.get(arch)
    bundle = Bundle.open(
        export_bundle(str(source), tmp_path / "fp16", precision="fp16", progress=False, height=size, width=size)
    )
    c = bundle.manifest.components
    assert c[component].precision == "fp32"
    assert c[component].attributes["fp16"].startswith("kept fp32: activations reach")
    assert c["transformer"].precision == "fp16" and "fp16" not in c["transformer"].attributes
    image = Pipeline(bundle)("a red circle", seed=0, num_inference_steps=1, output_type="np").images
    assert np.isfinite(image).all()


def test_a_text_encoder_whose_activations_fit_stays_fp16(models_root):
    c = Bundle.open(tiny_bundle("tiny-pixart-sigma", models_root, precision="fp16")).manifest.components
    assert c["text_encoder"].precision == "fp16" and "fp16" not in c["text_encoder"].attributes
