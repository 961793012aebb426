"""Export options: the choices each takes, the combinations refused before any work, and how provenance
names the sources."""

import numpy as np
import pytest

from edgediff.export.manifest_builder import recorded_path
from edgediff.export.options import ATTENTION_MODES, FIELD_NAMES, ExportOptions
from edgediff.runtime.errors import ExportError, ExportOptionsError


def test_cli_spellings_are_parsed():
    options = ExportOptions(
        keep="down_blocks.1/attentions.0, mid_block",
        loras=["style.safetensors:0.5", ("b", 1)],
        optimize=True,
        calibration_prompts=["a cat"],
    )
    assert options.keep == ("down_blocks.1/attentions.0", "mid_block")
    assert options.loras == (("style.safetensors", 0.5), ("b", 1.0))
    assert options.optimize == "cpu" and options.calibration_prompts == ("a cat",)
    assert ExportOptions(keep="auto").keep == "auto" and ExportOptions(optimize=False).optimize is None
    only = ExportOptions(precision="int4", quantize_only="text_encoder_3, transformer").quantize_only
    assert only == ("text_encoder_3", "transformer")
    # a decoder some family quantises (SANA's DC-AE in static int8) is known before the source is read
    assert ExportOptions(precision="int8-static", quantize_only="vae_decoder").quantize_only == ("vae_decoder",)


def test_from_cli_reads_the_prompt_file_and_palette_bits(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a blue square  \n", encoding="utf-8")
    options = ExportOptions.from_cli(precision="int8", calibration_prompts=str(prompts), keep="none", loras=())
    assert options.calibration_prompts == ("a red circle", "a blue square")
    assert ExportOptions.from_cli(target="coreml", palettize="6").palettize == 6


@pytest.mark.parametrize(
    "values,message",
    [
        ({"precision": "int3"}, "precision must be one of"),
        ({"target": "tflite"}, "target must be one of"),
        ({"optimize": "npu"}, "optimize must be one of"),
        ({"target": "coreml", "palettize": 5}, "palettize must be one of"),
        ({"attention": "diagonal"}, "unknown attention 'diagonal' for --target onnx"),
        ({"default_steps": 0}, "default steps must be >= 1"),
        ({"keep": " , "}, "block names"),
        ({"quantize_only": "text_encoder_3"}, "needs --precision int8, int8-static or int4, got fp32"),
        (
            {"precision": "int4", "quantize_only": "vae_decoder"},
            "int4 bundles do not quantise vae_decoder; they quantise text_encoder, ",
        ),
        (
            {"precision": "int8", "quantize_only": "vae_decoder"},
            "int8 bundles do not quantise vae_decoder; they quantise text_encoder, ",
        ),
        ({"palettize": 6}, "--palettize apply to --target coreml"),
        ({"attention": "split_einsum"}, "--attention split_einsum apply to --target coreml"),
        (
            {"target": "coreml", "precision": "int8", "loras": ["a.safetensors"]},
            "--precision and --lora apply to --target onnx",
        ),
        (
            {"target": "coreml", "tiny_decoder": "t", "vae": "v", "optimize": "cpu", "keep": "auto"},
            "--keep, --tiny-decoder, --vae and --optimize apply to --target onnx",
        ),
    ],
)
def test_refused_values_and_combinations(values, message):
    with pytest.raises(ExportOptionsError, match=message) as err:
        ExportOptions(**values)
    assert isinstance(err.value, ExportError) and isinstance(err.value, ValueError)


def test_every_target_has_its_attention_modes_and_options_copy_with_checks():
    assert set(ATTENTION_MODES) == {"onnx", "coreml"} and "split_einsum" in ATTENTION_MODES["coreml"]
    options = ExportOptions(target="coreml", attention="split_einsum", palettize=4)
    assert options.replace(palettize=8).palettize == 8
    with pytest.raises(ExportOptionsError):
        options.replace(target="onnx")
    assert set(options.to_dict()) == set(FIELD_NAMES)


def test_provenance_names_local_sources_relative_to_the_bundle(tmp_path):
    source = tmp_path / "models" / "src"
    source.mkdir(parents=True)
    assert recorded_path(str(source), tmp_path / "bundles" / "b") == "../../models/src"
    assert recorded_path("stabilityai/sd-turbo", tmp_path / "b") == "stabilityai/sd-turbo"
    assert recorded_path(None, tmp_path / "b") is None


def test_exported_manifest_records_no_absolute_path(models_root):
    pytest.importorskip("torch")
    pytest.importorskip("optimum")
    from tiny_models import tiny_bundle, tiny_source

    from edgediff.runtime import Bundle

    bundle = Bundle.open(tiny_bundle("tiny-sd1", models_root))
    recorded = bundle.manifest.provenance["source"]
    assert (
        not recorded.startswith("/")
        and (bundle.path / recorded).resolve() == tiny_source("tiny-sd1", models_root).resolve()
    )


# the probe's int8 layers against their fp32 form: 8-bit activations and 7-bit weights, no more than this apart
PROBE_LAYER_REL_RMS = 0.05


def test_auto_precision_follows_the_cpus_int8_instructions_or_measures(monkeypatch):
    from edgediff.export import int8_probe
    from edgediff.runtime import cpu_features

    measured = []
    monkeypatch.setattr(int8_probe, "probe", lambda: measured[-1])
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f", "avx512_vnni"}))
    assert ExportOptions(precision="auto").precision == "int8-static"  # measured faster there: no probe
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    for conv, matmul, expected in ((1.8, 1.9, "int8-static"), (1.0, 1.9, "int8"), (1.05, 1.1, "fp32")):
        measured.append(int8_probe.Int8Probe(conv=conv, matmul=matmul))
        assert ExportOptions(precision="auto").precision == expected
    # Core ML packages are fp16 whatever the CPU: auto leaves the precision option unset there
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    assert ExportOptions(target="coreml", precision="auto").precision == "fp32"


@pytest.mark.parametrize(("layer", "kernel"), [("conv", "QLinearConv"), ("matmul", "MatMulIntegerToFloat")])
def test_the_int8_probe_times_onnxruntimes_int8_kernel_on_the_same_layer(tmp_path, layer, kernel):
    """Each probe layer's int8 form runs as the int8 kernel int8-static bundles get, and computes what its fp32
    form does (speed goals live in benchmarks, not tests)."""
    import onnx
    import onnxruntime as ort

    from edgediff.export import int8_probe

    fp32, int8 = int8_probe._conv_graphs() if layer == "conv" else int8_probe._matmul_graphs()
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(int8.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    assert kernel in {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}
    shape = session.get_inputs()[0].shape
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    ref = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = session.run(None, {"x": x})[0]
    assert np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)) < PROBE_LAYER_REL_RMS
    assert 0 < getattr(int8_probe.probe(threads=1), layer) < float("inf")


def test_cpu_features_name_the_int8_instructions():
    from edgediff.runtime.cpu_features import int8_dot_product, int8_is_faster

    assert int8_dot_product(frozenset({"avx2", "avx_vnni"})) == "avx_vnni"
    assert int8_dot_product(frozenset({"avx2", "fma"})) is None
    assert not int8_is_faster(frozenset({"avx2", "avx_vnni"}))  # unmeasured there: not claimed
    assert int8_is_faster(frozenset({"avx512_vnni"}))
