"""Bad input gets a clear, typed error, and nothing is lost or half-written."""

import json
import os
import re
import shutil
import stat

import numpy as np
import pytest
from tiny_models import tiny_bundle, tiny_source

from edgediff.runtime import (
    Bundle,
    BundleError,
    ChecksumError,
    InputError,
    NaNOutputError,
    OutputPathError,
    Pipeline,
    PromptTruncatedWarning,
    ProviderError,
    SchemaVersionError,
)
from edgediff.runtime.bundle import sha256_file
from edgediff.runtime.image import save_image


@pytest.fixture
def bundle(models_root, tmp_path):
    """A private copy of the tiny SD 1.x bundle that a test may damage."""
    return shutil.copytree(tiny_bundle("tiny-sd1", models_root), tmp_path / "bundle")


def _rewrite_manifest(bundle, edit):
    path = bundle / "manifest.json"
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def _refresh_file_entry(bundle, component, name):
    def edit(raw):
        raw["components"][component]["files"][name] = {
            "size": (bundle / name).stat().st_size,
            "sha256": sha256_file(bundle / name),
        }

    _rewrite_manifest(bundle, edit)


def test_missing_graph(bundle):
    (bundle / "unet.onnx").unlink()
    with pytest.raises(BundleError, match="unet.onnx is missing"):
        Pipeline.from_bundle(bundle)


def test_missing_manifest(bundle):
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="no bundle at"):
        Bundle.open(bundle)


def test_missing_tokenizer(bundle):
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        Bundle.open(bundle)


def test_truncated_graph(bundle):
    data = (bundle / "unet.onnx").read_bytes()
    (bundle / "unet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="truncated or replaced"):
        Bundle.open(bundle, verify="size")


def test_truncated_graph_unverified_still_fails_cleanly(bundle):
    data = (bundle / "unet.onnx").read_bytes()
    (bundle / "unet.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="onnxruntime cannot load unet.onnx"):
        Pipeline.from_bundle(bundle, verify="none")


def test_checksum_mismatch(bundle):
    data = bytearray((bundle / "vae_decoder.onnx").read_bytes())
    data[-10] ^= 0xFF  # same size, one byte changed
    (bundle / "vae_decoder.onnx").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="vae_decoder.onnx fails its checksum"):
        Bundle.open(bundle)


def test_corrupt_manifest(bundle):
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(bundle)


def test_manifest_missing_field(bundle):
    _rewrite_manifest(bundle, lambda raw: raw.pop("scheduler"))
    with pytest.raises(BundleError, match="missing or malformed field 'scheduler'"):
        Bundle.open(bundle)


def test_newer_schema(bundle):
    _rewrite_manifest(bundle, lambda raw: raw.update(schema_version=raw["schema_version"] + 1))
    with pytest.raises(SchemaVersionError, match="newer than this edgediff understands"):
        Bundle.open(bundle)


def test_manifest_path_leaving_the_bundle(bundle, tmp_path):
    (tmp_path / "secret.onnx").write_bytes(b"x")

    def edit(raw):
        files = raw["components"]["unet"]["files"]
        raw["components"]["unet"]["files"] = {"../secret.onnx": {"size": 1, "sha256": "0"}, **files}

    _rewrite_manifest(bundle, edit)
    with pytest.raises(BundleError, match="outside its folder"):
        Bundle.open(bundle)


def test_symlink_leaving_the_bundle(bundle, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    shutil.move(bundle / "unet.onnx", outside)
    (bundle / "unet.onnx").symlink_to(outside)
    with pytest.raises(BundleError, match="outside its folder"):
        Bundle.open(bundle)


def test_external_data_outside_the_bundle_is_refused(bundle, tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(bundle / "vae_decoder.onnx"))
    onnx.save_model(
        model, str(bundle / "vae_decoder.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0
    )
    shutil.move(bundle / "w.bin", tmp_path / "w.bin")
    model = onnx.load(str(bundle / "vae_decoder.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save_model(model, str(bundle / "vae_decoder.onnx"))
    _refresh_file_entry(bundle, "vae_decoder", "vae_decoder.onnx")
    with pytest.raises(BundleError, match="cannot load vae_decoder.onnx"):
        Pipeline.from_bundle(bundle)


def test_unknown_sampler(bundle):
    with pytest.raises(InputError, match="unknown sampler 'pndm'"):
        Pipeline.from_bundle(bundle, sampler="pndm")


def test_more_steps_than_a_distilled_grid_is_an_input_error():
    from edgediff.models.shipped import default_bundle

    with pytest.raises(InputError, match="sampler 'lcm' cannot take these steps: .*exceeds"):
        Pipeline.from_bundle(default_bundle())("a red circle", num_inference_steps=500)


def test_a_flow_sampler_on_a_noise_predicting_unet_is_refused_at_open(bundle):
    with pytest.raises(InputError, match="sampler 'flow_euler' .* cannot drive a model that predicts 'epsilon'"):
        Pipeline.from_bundle(bundle, sampler="flow_euler")


def test_unknown_provider(bundle):
    with pytest.raises(ProviderError, match="unknown provider 'warp-drive'"):
        Pipeline.from_bundle(bundle, provider="warp-drive")


def test_unavailable_provider_is_an_error_unless_fallback(bundle, caplog):
    import onnxruntime as ort

    if "DmlExecutionProvider" in ort.get_available_providers():
        pytest.skip("DirectML is available here")
    with pytest.raises(ProviderError, match="'directml' is not available"):
        Pipeline.from_bundle(bundle, provider="directml")
    with caplog.at_level("WARNING", logger="edgediff.providers"):
        pipe = Pipeline.from_bundle(bundle, provider="directml", fallback=True)
    assert "falling back" in caplog.text
    assert pipe.sessions.get("unet").providers[0] != "DmlExecutionProvider"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"width": 30}, "width must be a positive multiple of 8"),
        ({"height": 12}, "height must be a positive multiple of 8"),
        ({"height": 0}, "height must be a positive multiple of 8"),
        ({"num_inference_steps": 0}, "num_inference_steps must be >= 1"),
        ({"num_inference_steps": -3}, "num_inference_steps must be >= 1"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt must be >= 1"),
        ({"latents": np.zeros((1, 4, 3, 3), np.float32)}, "latents must have shape"),
    ],
)
def test_bad_generation_arguments(bundle, kwargs, match):
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(InputError, match=match):
        pipe("a red circle", **kwargs)


def test_sizes_off_the_unets_grid_are_refused_naming_the_nearest_valid():
    from edgediff.models.shipped import default_bundle

    # the shipped UNet halves its latents twice and a latent cell is 4 pixels: sides are multiples of 16
    with Pipeline.from_bundle(default_bundle(), provider="cpu") as pipe:
        with pytest.raises(
            InputError,
            match=r"height must be a multiple of 16 .*halves the latent grid 2 times.*"
            r"got 72; nearest valid: 64 or 80$",
        ):
            pipe("a red circle", height=72, num_inference_steps=1)
        assert pipe("a red circle", height=80, width=48, num_inference_steps=1).images[0].size == (48, 80)


def test_the_unet_graph_itself_needs_its_grid():
    """Why the rule: the graph's traced 2x upsamplings miss their skip connections off the grid."""
    import onnxruntime as ort

    from edgediff.models.shipped import default_bundle

    bundle = Bundle.open(default_bundle())
    session = ort.InferenceSession(str(bundle.path / "unet.onnx"), providers=["CPUExecutionProvider"])
    multiple = bundle.manifest.components["unet"].attributes["latent_multiple"]

    def run(cells):
        feeds = {
            "sample": np.zeros((1, 4, cells, multiple * 4), np.float32),
            "timestep": np.array(1.0, np.float32),
            "encoder_hidden_states": np.zeros((1, bundle.manifest.tokenizer["max_length"], 64), np.float32),
            "timestep_cond": np.zeros((1, 64), np.float32),
        }
        return session.run(None, feeds)[0]

    assert run(multiple * 5).shape[2] == multiple * 5
    with pytest.raises(Exception, match="Concat"):
        run(multiple * 5 - multiple // 2)


def test_over_long_prompt_is_truncated_with_a_warning_as_diffusers_does(bundle, models_root):
    transformers = pytest.importorskip("transformers")
    pipe = Pipeline.from_bundle(bundle)
    prompt = " ".join(["a large red circle on a blue background"] * 12)
    with pytest.warns(PromptTruncatedWarning, match="truncated"):
        ids = pipe.tokenizer([prompt])
    reference = transformers.CLIPTokenizer.from_pretrained(tiny_source("tiny-sd1", models_root) / "tokenizer")
    expected = reference([prompt], padding="max_length", max_length=77, truncation=True).input_ids
    assert ids.tolist() == expected


def test_nan_output_is_an_error(bundle):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    # A decoder whose output is sqrt(-(|x| + 1)): NaN everywhere, as an fp16 overflow would give.
    nodes = [
        helper.make_node("Abs", ["latent_sample"], ["a"]),
        helper.make_node("Neg", ["a"], ["n"]),
        helper.make_node("Sqrt", ["n"], ["sample"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("latent_sample", TensorProto.FLOAT, ["b", 4, "h", "w"])],
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["b", 4, "h", "w"])],
    )
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bundle / "vae_decoder.onnx")
    )
    _refresh_file_entry(bundle, "vae_decoder", "vae_decoder.onnx")
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(NaNOutputError, match="VAE decoder produced NaN"):
        pipe("a red circle", num_inference_steps=1, seed=0)


@pytest.mark.parametrize(
    "name,match",
    [
        ("not-a-folder.txt/out.png", "does not exist"),
        ("out.gif2", "unknown image format"),
        ("a-folder", "unknown image format"),
    ],
)
def test_unwritable_output_path(tmp_path, name, match):
    from PIL import Image

    (tmp_path / "not-a-folder.txt").write_text("x")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(OutputPathError, match=match):
        save_image(Image.new("RGB", (8, 8)), tmp_path / name)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_saved_image_has_the_permissions_writing_it_directly_would_give(tmp_path):
    """Written through a private temporary file (0600) for atomicity, the image still gets the umask's permissions,
    or keeps those of the file it replaces."""
    from PIL import Image

    old = os.umask(0o022)
    try:
        fresh = save_image(Image.new("RGB", (8, 8)), tmp_path / "new.png")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "kept.png"
        kept.write_bytes(b"old")
        kept.chmod(0o640)
        save_image(Image.new("RGB", (8, 8)), kept)
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() != b"old"
    finally:
        os.umask(old)


def test_output_path_that_is_a_folder(tmp_path):
    from PIL import Image

    (tmp_path / "x.png").mkdir()
    with pytest.raises(OutputPathError, match="it is a folder"):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png")


@pytest.mark.parametrize(
    "component,named",
    [("text_encoder", "text encoder"), ("unet", "denoiser (unet)"), ("vae_decoder", "full VAE decoder")],
)
def test_nan_in_any_stage_is_named(models_root, component, named):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    session = pipe.sessions.get(component)
    real_run = session.run
    session.run = lambda run_options=None, **feeds: [o * np.float32("nan") for o in real_run(run_options, **feeds)]
    with pytest.raises(NaNOutputError, match=f"the {re.escape(named)} produced NaN"):
        pipe("a red circle", num_inference_steps=2, seed=0)
