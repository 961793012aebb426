"""Core ML target: export on any OS (packages checked against their specs and the manifest); running
the packages needs macOS, where the prediction tests run (they say so when skipped)."""

import sys

import numpy as np
import pytest

pytest.importorskip("coremltools")
pytest.importorskip("torch")

from tiny_models import tiny_source  # noqa: E402

from edgediff.runtime import Bundle, InputError, Pipeline, ProviderError  # noqa: E402

MACOS_ONLY = pytest.mark.skipif(
    sys.platform != "darwin", reason="Core ML predictions need macOS (coremltools' runtime)"
)
# package size against fp16. Only tensors of 2048+ weights are palettised (coremltools' default), so a
# tiny random model shrinks less than a real one: the shipped UNet measured 0.40 at 6 bits.
PALETTE_SIZE_RATIO_MAX = {"tiny, 4 bits": 0.75, "shipped, 6 bits": 0.55}


@pytest.fixture(scope="module")
def coreml_bundles(models_root):
    from edgediff.export.coreml import export_coreml

    src = str(tiny_source("tiny-sd1", models_root))
    return {
        "fp16": export_coreml(src, models_root / "coreml-sd1"),
        "palette4": export_coreml(src, models_root / "coreml-sd1-p4", palettize=4),
    }


def test_packages_match_their_specs_and_the_manifest(coreml_bundles):
    from edgediff.export.coreml import package_io

    bundle = Bundle.open(coreml_bundles["fp16"])  # every file of every package checksummed
    m = bundle.manifest
    assert m.target == "coreml" and set(m.components) == {"text_encoder", "unet", "vae_decoder"}
    for name, spec in m.components.items():
        package = bundle.component_path(name)
        assert package.suffix == ".mlpackage" and package.is_dir()
        inputs, outputs = package_io(package)
        assert inputs == spec.inputs and outputs == spec.outputs
    h, w = m.defaults["height"] // m.vae_scale_factor, m.defaults["width"] // m.vae_scale_factor
    unet_in = {t.name: t for t in m.components["unet"].inputs}
    assert unet_in["sample"].shape == [2, m.latent_channels, h, w]  # static, with the CFG pair (guidance 7.5)
    assert unet_in["sample"].dtype == "float32" and m.components["text_encoder"].inputs[0].dtype == "int32"
    assert m.provenance["export_check"]["max_rel_diff"]["unet"] == (
        {"numeric": "skipped: Core ML predictions need macOS"}
        if sys.platform != "darwin"
        else m.provenance["export_check"]["max_rel_diff"]["unet"]
    )


def test_palettised_weights_have_the_asked_bit_width_and_size(coreml_bundles):
    from edgediff.export.coreml import palette_sizes

    fp16, p4 = Bundle.open(coreml_bundles["fp16"]), Bundle.open(coreml_bundles["palette4"])
    sizes = palette_sizes(p4.component_path("unet"))
    assert sizes and set(sizes) == {2**4}
    assert p4.manifest.components["unet"].attributes["palettized_bits"] == 4
    ratio = p4.manifest.components["unet"].size / fp16.manifest.components["unet"].size
    assert ratio <= PALETTE_SIZE_RATIO_MAX["tiny, 4 bits"], ratio


def test_shipped_model_exports_to_coreml_palettised(tmp_path):
    from edgediff.export.coreml import export_coreml, palette_sizes
    from training.ship import DEFAULT_STEPS, STUDENT_DIR

    out = export_coreml(
        str(STUDENT_DIR), tmp_path / "shipped-coreml", palettize=6, default_steps=DEFAULT_STEPS, default_guidance=4.0
    )
    m = Bundle.open(out).manifest
    assert m.family == "lcm-sd1" and m.defaults["steps"] == DEFAULT_STEPS
    unet_in = {t.name: t for t in m.components["unet"].inputs}
    assert unet_in["sample"].shape[0] == 1 and "timestep_cond" in unet_in  # LCM: no CFG pair, guidance embedded
    assert set(palette_sizes(Bundle.open(out).component_path("unet"))) == {2**6}
    fp16_unet_bytes = sum(p.stat().st_size for p in (STUDENT_DIR / "unet").glob("*.safetensors"))  # fp16 weights
    assert m.components["unet"].size / fp16_unet_bytes <= PALETTE_SIZE_RATIO_MAX["shipped, 6 bits"]


def test_split_einsum_package_holds_the_neural_engine_layout(models_root, tmp_path):
    """--attention split_einsum: every attention softmax of the UNet package runs over the keys of a
    (batch, keys, 1, queries) tensor, as Apple lays attention out for the Neural Engine; the package matches its
    spec and the manifest says which attention it holds."""
    import coremltools as ct

    from edgediff.export.coreml import export_coreml, package_io

    bundle = Bundle.open(
        export_coreml(str(tiny_source("tiny-sd1", models_root)), tmp_path / "se", attention="split_einsum")
    )
    unet = bundle.manifest.components["unet"]
    assert unet.attributes["attention"] == "split_einsum" and unet.attributes["attention_layers"] > 0
    assert package_io(bundle.component_path("unet")) == (unet.inputs, unet.outputs)
    spec = ct.models.MLModel(str(bundle.component_path("unet")), skip_model_load=True).get_spec()
    shapes = [
        [d.constant.size for d in op.outputs[0].type.tensorType.dimensions]
        for function in spec.mlProgram.functions.values()
        for block in function.block_specializations.values()
        for op in block.operations
        if op.type == "softmax"
    ]
    assert len(shapes) >= unet.attributes["attention_layers"]  # one per head
    assert all(len(s) == 4 and s[2] == 1 for s in shapes), shapes


def test_a_failed_coreml_export_leaves_nothing(models_root, tmp_path):
    from edgediff.export.coreml import export_coreml
    from edgediff.runtime.errors import ExportError

    with pytest.raises(ExportError, match="unknown attention 'diagonal'"):
        export_coreml(str(tiny_source("tiny-sd1", models_root)), tmp_path / "x", attention="diagonal")
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the message other systems give")
def test_running_a_coreml_bundle_off_macos_is_a_clear_error(coreml_bundles):
    with pytest.raises(ProviderError, match="Core ML bundles run on macOS"):
        Pipeline.from_bundle(coreml_bundles["fp16"])


@MACOS_ONLY
def test_coreml_pipeline_matches_the_onnx_one(models_root, coreml_bundles):
    from tiny_models import tiny_bundle

    onnx = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))(
        "a cat", seed=0, num_inference_steps=2, output_type="np"
    )
    coreml = Pipeline.from_bundle(coreml_bundles["fp16"], compute_units="cpu_only")
    out = coreml("a cat", seed=0, num_inference_steps=2, output_type="np")
    assert np.abs(out.images - onnx.images).max() <= 8 / 255  # fp16 packages vs fp32 graphs
    with pytest.raises(InputError, match="static shapes"):
        coreml("a cat", height=128, width=128)


@MACOS_ONLY
def test_split_einsum_package_predicts_what_the_original_does(models_root, coreml_bundles, tmp_path):
    from edgediff.export.coreml import export_coreml

    split = export_coreml(str(tiny_source("tiny-sd1", models_root)), tmp_path / "se", attention="split_einsum")
    images = [
        Pipeline.from_bundle(b, compute_units="cpu_only")(
            "a cat", seed=0, num_inference_steps=2, output_type="np"
        ).images
        for b in (coreml_bundles["fp16"], split)
    ]
    assert np.abs(images[0] - images[1]).max() <= 4 / 255  # fp16 arithmetic in another order
