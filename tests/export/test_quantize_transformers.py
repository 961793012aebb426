"""Quantised bundles of the transformer families (SD3, FLUX, SANA, PixArt-Sigma): every text encoder and the
transformer take the precision's scheme, `--keep auto` ranks their blocks, and the images stay near fp32's from the same seed."""

import numpy as np
import pytest

pytest.importorskip("torch")

from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.benchmarks.metrics import psnr  # noqa: E402
from edgediff.runtime import Bundle, Pipeline  # noqa: E402

pytestmark = pytest.mark.export

# Mean PSNR against the fp32 bundle's image, on tiny random models (whose outputs are near noise, so this
# only catches a broken graph or a scheme applied wrongly; quality floors are judged on the shipped model)
TINY_QUANTISED_PSNR_FLOOR = 20.0
SIZE = {"tiny-sd3": 32, "tiny-flux-schnell": 64, "tiny-sana": 64, "tiny-pixart-sigma": 64}


def _image(bundle, arch):
    with Pipeline.from_bundle(bundle, provider="cpu") as pipe:
        out = pipe("a red circle", seed=3, num_inference_steps=2, height=SIZE[arch], width=SIZE[arch], output_type="np")
    return out.images[0]


@pytest.mark.parametrize(
    "arch,precision,keep",
    [
        ("tiny-sd3", "int8", "auto"),
        ("tiny-sd3", "int4", "none"),
        ("tiny-flux-schnell", "int8-static", "auto"),
        # Gemma-2 and the linear-attention DiT dynamic, DC-AE's decoder static (Family.static_int8_decoder)
        ("tiny-sana", "int8-static", "auto"),
        ("tiny-pixart-sigma", "int4", "auto"),  # T5 and the learned-sigma DiT
    ],
)
def test_transformer_bundles_quantise_every_text_encoder_and_the_transformer(
    models_root, tmp_path, arch, precision, keep
):
    from edgediff.export import ExportOptions, export

    size = SIZE[arch]
    options = ExportOptions(precision=precision, keep=keep, height=size, width=size)
    bundle = export(str(tiny_source(arch, models_root)), tmp_path / precision, options, progress=False)
    m = Bundle.open(bundle).manifest
    text = [e["component"] for e in m.text_encoders]
    assert "transformer" in m.components and text
    for name in (*text, "transformer"):
        q = m.components[name].attributes["quantization"]
        assert q["scheme"] in ("int8-dynamic", "int4-weight-only") and q["quantised_nodes"] > 0, (name, q)
        assert q["error"] <= q["budget"] or keep == "none", (name, q)
        if keep == "auto":
            assert q["block_errors"], name  # the blocks were found and ranked
    decoder = m.components["vae_decoder"].attributes["quantization"]
    if arch == "tiny-sana" and precision == "int8-static":  # most of SANA's time on CPUs: static int8
        assert decoder["scheme"] == "int8-static" and decoder["quantised_nodes"] > 0, decoder
        assert decoder["error"] <= decoder["budget"] and decoder["block_errors"], decoder
        assert m.components["vae_decoder"].precision == "int8-static"
    else:  # the KL VAEs' decoders stay fp32
        assert decoder["scheme"] is None, decoder
    reference = tiny_bundle(arch, models_root) if arch == "tiny-flux-schnell" else None  # at its own size
    if reference is None:
        reference = export(
            str(tiny_source(arch, models_root)),
            tmp_path / "fp32",
            ExportOptions(height=size, width=size),
            progress=False,
        )
    fp32, quantised = _image(reference, arch), _image(bundle, arch)
    assert np.isfinite(quantised).all()
    assert psnr(quantised, fp32) >= TINY_QUANTISED_PSNR_FLOOR


def test_quantize_only_leaves_every_other_component_fp32(models_root, tmp_path):
    """SD3 with T5 alone in 4 bits: the transformer and the CLIP encoders keep their fp32 graphs, byte for byte."""
    from edgediff.export import ExportOptions, export
    from edgediff.runtime.errors import ExportOptionsError

    source, size = str(tiny_source("tiny-sd3", models_root)), SIZE["tiny-sd3"]
    options = ExportOptions(precision="int4", quantize_only="text_encoder_3", height=size, width=size)
    bundle = Bundle.open(export(source, tmp_path / "t5-int4", options, progress=False))
    fp32 = Bundle.open(export(source, tmp_path / "fp32", ExportOptions(height=size, width=size), progress=False))
    q = {name: spec.attributes["quantization"] for name, spec in bundle.manifest.components.items()}
    assert q["text_encoder_3"]["scheme"] == "int4-weight-only" and q["text_encoder_3"]["quantised_nodes"] > 0
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        assert q[name] == {"scheme": None, "why": "not named by --quantize-only"}, name
        assert bundle.manifest.components[name].files == fp32.manifest.components[name].files  # sha256 included
    # a component this model lacks is refused before anything is exported
    without_t5 = ExportOptions(precision="int4", quantize_only="text_encoder_3", t5=False, height=size, width=size)
    with pytest.raises(ExportOptionsError, match="text_encoder_3: not quantised in this model's bundles"):
        export(source, tmp_path / "no-t5", without_t5, progress=False)
    assert not (tmp_path / "no-t5").exists()
    # so is a component this family keeps fp32: SD3's KL decoder is never static int8 (SANA's DC-AE is)
    decoder = ExportOptions(precision="int8-static", quantize_only="vae_decoder", height=size, width=size)
    with pytest.raises(
        ExportOptionsError,
        match="vae_decoder: not quantised .*its family keeps it fp32; its quantisable components: text_encoder, ",
    ):
        export(source, tmp_path / "decoder", decoder, progress=False)
    assert not (tmp_path / "decoder").exists()


def test_quantize_only_takes_the_family_static_decoder(models_root, tmp_path):
    """SANA's DC-AE decoder alone in static int8 (the rest fp32): the option names what the family quantises."""
    from edgediff.export import ExportOptions, export

    source, size = str(tiny_source("tiny-sana", models_root)), SIZE["tiny-sana"]
    options = ExportOptions(precision="int8-static", quantize_only="vae_decoder", height=size, width=size)
    bundle = Bundle.open(export(source, tmp_path / "dcae-int8", options, progress=False))
    q = {name: spec.attributes["quantization"] for name, spec in bundle.manifest.components.items()}
    assert q["vae_decoder"]["scheme"] == "int8-static" and q["vae_decoder"]["quantised_nodes"] > 0
    assert {name for name, v in q.items() if v["scheme"]} == {"vae_decoder"}
