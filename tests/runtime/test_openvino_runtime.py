"""The `ov` provider: bundles run by OpenVINO's own runtime (runtime/openvino_session.py), against onnxruntime's CPU
provider on the same bundle and seed; what `auto` picks. The external-data check OpenVINO's graphs pass first is in
test_external_data.py."""

import logging
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny_bundle, tiny_sd3_bundle

from edgediff.benchmarks.metrics import psnr
from edgediff.cli.main import cli
from edgediff.runtime import BundleError, InputError, Pipeline
from edgediff.runtime import openvino_session as ovs
from edgediff.runtime import providers as prov

ov = pytest.importorskip("openvino", reason="OpenVINO's runtime is the dev extra's (pip install openvino)")

# OpenVINO in f32 against onnxruntime's CPU provider on the same tiny fp32 bundle and seed: the two runtimes fuse and
# order float sums differently (seen: up to 2e-6 on images in [0, 1])
OV_F32_ATOL = 1e-4
# a quantised bundle on OpenVINO against the same bundle on onnxruntime's CPU provider (seen: 56 dB int8, 48 dB
# int8-static); the quality floor of the quantisation tests
OV_QUANTISED_PSNR_FLOOR_DB = 30.0
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 is OpenVINO's default on CPUs with AVX-512 BF16 or AMX


def _images(bundle, **options):
    with Pipeline.from_bundle(bundle, cache=False, **options) as pipe:
        return pipe("a cat", seed=3, output_type="np").images, pipe.provider_report()


@pytest.mark.parametrize("arch", ["tiny-sd1", "tiny-sd-turbo", "tiny-sd3"])
def test_a_bundle_run_by_openvino_makes_the_cpu_providers_image(models_root, arch):
    """SD3's T5 output is also an inner node's: the manifest's output names are the ones read."""
    bundle = tiny_sd3_bundle(models_root) if arch == "tiny-sd3" else tiny_bundle(arch, models_root)
    expected, _ = _images(bundle, provider="cpu")
    got, report = _images(bundle, provider="ov", provider_options=F32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=OV_F32_ATOL)
    assert report["provider"] == "ov" and len(report["graphs"]) >= 3
    assert {tuple(g["providers"]) for g in report["graphs"].values()} == {("OpenVINO CPU (f32)",)}
    assert not any(g["cpu_fallback"] for g in report["graphs"].values())


@pytest.mark.parametrize("precision", ["int8", "int8-static"])
def test_a_quantised_bundle_on_openvino_keeps_the_cpu_providers_image(models_root, precision):
    """OpenVINO quantises dynamic int8 activations and fuses QDQ nodes its own way (seen: up to 0.02 apart on images
    in [0, 1]): judged by PSNR against the CPU provider's image of the same bundle, in OpenVINO's default for it."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root, precision)
    expected, _ = _images(bundle, provider="cpu")
    got, report = _images(bundle, provider="ov")
    assert psnr(got[0], expected[0]) >= OV_QUANTISED_PSNR_FLOOR_DB
    assert report["graphs"]["unet"]["providers"] == ["OpenVINO CPU (f32)"]  # its float parts in f32 (compile_config)


def test_a_quantised_graph_computes_in_f32_and_an_fp32_one_at_the_cpus_default():
    """bf16 around int8 operators lost the shipped model's images (docs/benchmarks.md): a quantised graph's float
    parts stay f32 on the CPU unless the caller says otherwise; a GPU or NPU gets no CPU threads."""
    device, fp32 = ovs.compile_config({"device_type": "CPU"}, "fp32", 3, None)
    assert device == "CPU" and fp32 == {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": "3"}
    for precision in ("int8", "int8-static", "int4"):
        assert ovs.compile_config({}, precision, 2, None)[1]["INFERENCE_PRECISION_HINT"] == "f32"
    asked = ovs.compile_config({"INFERENCE_PRECISION_HINT": "bf16"}, "int8-static", 2, None)[1]
    assert asked["INFERENCE_PRECISION_HINT"] == "bf16"  # the caller's option wins
    device, gpu = ovs.compile_config({"device_type": "GPU"}, "int8", None, None)
    assert device == "GPU" and gpu == {"PERFORMANCE_HINT": "LATENCY"}


def test_openvinos_compiled_graphs_go_in_the_graph_caches_folder(models_root, tmp_path, monkeypatch):
    """Its CACHE_DIR is the folder "ov" of the graph cache: listed, evicted and cleared with the rest."""
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path))
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    with Pipeline.from_bundle(bundle, provider="ov", provider_options=F32) as pipe:
        first = pipe("a cat", seed=3, output_type="np").images
        assert {g["cache"] for g in pipe.provider_report()["graphs"].values()} == {"provider"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ov"] and any((tmp_path / "ov").iterdir())
    with Pipeline.from_bundle(bundle, provider="ov", provider_options=F32) as pipe:  # from the compiled cache
        np.testing.assert_array_equal(pipe("a cat", seed=3, output_type="np").images, first)
    listed = CliRunner().invoke(cli, ["cache", "list"])
    assert listed.exit_code == 0 and "ov/" in listed.output, listed.output


def test_a_graph_openvino_cannot_read_is_an_error_or_with_fallback_runs_on_the_cpu(models_root, monkeypatch, caplog):
    """An operator OpenVINO's ONNX reader does not know is found as the pipeline opens (the graph is read then)."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    expected, _ = _images(bundle, provider="cpu")
    real = ovs.core().read_model

    def read_model(path, *args):
        if str(path).endswith("text_encoder.onnx"):
            raise RuntimeError("Exception from src/frontends/onnx\nat line 42\nunsupported operator FancyOp")
        return real(path, *args)

    monkeypatch.setattr(ovs.core(), "read_model", read_model)
    with pytest.raises(BundleError, match=r"OpenVINO cannot read or compile text_encoder.onnx: .*FancyOp; --fallback"):
        Pipeline.from_bundle(bundle, provider="ov", provider_options=F32, cache=False)
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        got, report = _images(bundle, provider="ov", provider_options=F32, fallback=True)
    assert "text_encoder: OpenVINO cannot read or compile this graph" in caplog.text
    assert report["refused"] == {"text_encoder": "Exception from src/frontends/onnx ... unsupported operator FancyOp"}
    assert report["graphs"]["text_encoder"]["providers"] == ["CPUExecutionProvider"]
    assert report["graphs"]["text_encoder"]["cpu_fallback"] and not report["graphs"]["unet"]["cpu_fallback"]
    np.testing.assert_allclose(got, expected, rtol=0, atol=OV_F32_ATOL)


# --- compiled for each input shape ---


def _compiled(model) -> tuple[str, str]:
    """What compile_model was given: (the graph file, for a graph compiled from its file, else its first input's
    name; "dynamic", or the first input's shape where the graph is fixed)."""
    if isinstance(model, str):  # compiled from the file: dynamic
        return Path(model).name, "dynamic"
    first = model.inputs[0]
    shape = first.get_partial_shape()
    return first.get_any_name(), str(shape) if shape.is_static else "dynamic"


def _compiles(monkeypatch) -> list:
    """Each compile's _compiled()."""
    seen, real = [], ovs.core().compile_model

    def compile_model(model, *args):
        seen.append(_compiled(model))
        return real(model, *args)

    monkeypatch.setattr(ovs.core(), "compile_model", compile_model)
    return seen


def test_each_image_size_runs_on_the_graph_compiled_for_it(models_root, monkeypatch):
    """A graph is compiled when a call first brings its input shape, fixed to it; the compiled form follows the size
    asked for, one at a time, and each size's image is the CPU provider's."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    sizes = (64, 32, 64)
    with Pipeline.from_bundle(bundle, provider="cpu", cache=False) as pipe:
        expected = [pipe("a cat", seed=3, height=s, width=s, output_type="np").images for s in sizes]
    compiles = _compiles(monkeypatch)
    reported = []
    with Pipeline.from_bundle(bundle, provider="ov", provider_options=F32, cache=False) as pipe:
        assert compiles == []  # read as it opens, compiled on its first call
        for size, want in zip(sizes, expected):
            got = pipe("a cat", seed=3, height=size, width=size, output_type="np").images
            np.testing.assert_allclose(got, want, rtol=0, atol=OV_F32_ATOL)
            reported.append(pipe.provider_report()["graphs"]["unet"]["shapes"])
    assert all(r.startswith("fixed ") and "sample 1x4x" in r for r in reported), reported
    assert reported[0] == reported[2] != reported[1]
    unet = [shape for name, shape in compiles if name == "sample"]
    encoder = [shape for name, shape in compiles if name == "input_ids"]
    # the UNet compiled at each size change; the text encoder once, its shape never changed; nothing dynamic
    assert len(unet) == 3 and unet[0] == unet[2] != unet[1] and encoder == ["[1,77]"]
    assert "dynamic" not in {shape for _, shape in compiles}


def test_shapes_dynamic_compiles_each_graph_once_as_it_opens(models_root, monkeypatch):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    compiles = _compiles(monkeypatch)
    with Pipeline.from_bundle(
        bundle, provider="ov", provider_options={**F32, "shapes": "dynamic"}, cache=False
    ) as pipe:
        opened = len(compiles)
        for size in (64, 32):
            pipe("a cat", seed=3, height=size, width=size, output_type="np")
        assert {g["shapes"] for g in pipe.provider_report()["graphs"].values()} == {"dynamic"}
    assert opened == len(compiles) >= 3 and {shape for _, shape in compiles} == {"dynamic"}
    with pytest.raises(prov.ProviderError, match=r"provider option shapes must be one of static, dynamic, got 'fixed'"):
        Pipeline.from_bundle(bundle, provider="ov", provider_options={"shapes": "fixed"}, cache=False)


def test_a_shape_openvino_will_not_compile_runs_on_the_dynamic_graph(models_root, monkeypatch, caplog):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    expected, _ = _images(bundle, provider="cpu")
    compiles, real = [], ovs.core().compile_model

    def compile_model(model, *args):
        name, shape = _compiled(model)
        compiles.append(shape != "dynamic")
        if (name, shape != "dynamic") == ("sample", True):
            raise RuntimeError("Exception from src/plugins/intel_cpu\nat line 7\nno kernel for this shape")
        return real(model, *args)

    monkeypatch.setattr(ovs.core(), "compile_model", compile_model)
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        with Pipeline.from_bundle(bundle, provider="ov", provider_options=F32, cache=False) as pipe:
            for _ in range(2):  # the refused shape is not tried again
                got = pipe("a cat", seed=3, output_type="np").images
                np.testing.assert_allclose(got, expected, rtol=0, atol=OV_F32_ATOL)
            shapes = pipe.provider_report()["graphs"]["unet"]["shapes"]
    assert shapes == "refused: Exception from src/plugins/intel_cpu ... no kernel for this shape"
    assert "unet: OpenVINO cannot compile it for encoder_hidden_states 1x77x" in caplog.text
    assert compiles.count(False) == 1  # the UNet compiled dynamic once; the other graphs fixed to their shapes


def test_a_graph_openvino_compiles_neither_fixed_nor_dynamic_fails_the_call_or_with_fallback_runs_on_the_cpu(
    models_root, monkeypatch, caplog
):
    """Found at the first call (the graph read fine as the pipeline opened): without --fallback a clear error each
    call; with it, the CPU provider runs the graph from then on, logged and reported as a refusal at open is."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    expected, _ = _images(bundle, provider="cpu")
    real = ovs.core().compile_model

    def compile_model(model, *args):
        if _compiled(model)[0] in ("sample", "unet.onnx"):
            raise RuntimeError("Exception from src/plugins/intel_cpu\nat line 7\nno kernel for this graph")
        return real(model, *args)

    monkeypatch.setattr(ovs.core(), "compile_model", compile_model)
    with Pipeline.from_bundle(bundle, provider="ov", provider_options=F32, cache=False) as pipe:
        with pytest.raises(
            BundleError, match=r"cannot compile unet.onnx for this call's shapes \(encoder_hidden_states"
        ):
            pipe("a cat", seed=3)
        with pytest.raises(BundleError, match=r"no kernel for this graph; --fallback runs such a graph on onnxruntime"):
            pipe("a cat", seed=3)  # tried again: nothing was kept of the failed compiles
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        got, report = _images(bundle, provider="ov", provider_options=F32, fallback=True)
    np.testing.assert_allclose(got, expected, rtol=0, atol=OV_F32_ATOL)
    assert "unet: OpenVINO cannot compile this graph" in caplog.text
    assert report["refused"] == {"unet": "Exception from src/plugins/intel_cpu ... no kernel for this graph"}
    unet = report["graphs"]["unet"]
    assert (
        unet["providers"] == ["CPUExecutionProvider"] and unet["cpu_fallback"] and unet["shapes"].startswith("refused")
    )
    assert not report["graphs"]["text_encoder"]["cpu_fallback"]


def test_a_graph_is_reported_not_compiled_until_its_first_call(models_root):
    with Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="ov", cache=False) as pipe:
        assert {g["shapes"] for g in pipe.provider_report()["graphs"].values()} == {"not compiled yet"}
        assert pipe.provider_report()["graphs"]["unet"]["providers"] == [f"OpenVINO CPU ({_cpu_default()})"]


def _cpu_default() -> str:
    """OpenVINO's CPU plugin's own inference precision on this machine (bf16 with AVX-512 BF16 or AMX)."""
    return ovs.core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def test_run_time_loras_on_openvino_are_a_clear_error(models_root):
    """A call's run-time LoRA is an onnxruntime adapter: a graph OpenVINO runs says so instead of ignoring it."""
    from edgediff.runtime import lora_adapters

    with Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="ov", cache=False) as pipe:
        encoder = pipe.sessions.get("text_encoder")
        with lora_adapters.active({"text_encoder": object()}):
            with pytest.raises(InputError, match="run-time LoRAs are onnxruntime's adapters: the ov provider"):
                encoder.run(input_ids=np.zeros((1, 77), np.int64))


def test_ov_is_listed_and_named_in_errors_where_openvino_is_missing(monkeypatch):
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0 and any(line.startswith("ov ") for line in result.output.splitlines())
    monkeypatch.setattr(prov.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(prov.ProviderError, match=r"'ov' runs graphs through the openvino package, which is not"):
        prov.resolve("ov")
    with pytest.raises(prov.ProviderError, match=r'to get it: pip install "edgediff\[ov\]"; or pass --fallback'):
        prov.resolve("ov")
    assert prov.resolve("ov", fallback=True).provider.name == "cpu"


# --- what auto picks ---


@pytest.mark.parametrize(
    "flags,precision,switch,expected",
    [
        ({"amx_bf16", "avx512_bf16"}, "fp32", None, "ov"),
        ({"amx_bf16", "avx512_bf16"}, None, None, "ov"),  # a caller that knows no bundle (`edgediff providers`)
        ({"amx_bf16", "avx512_bf16"}, "int8-static", None, "cpu"),  # no faster there, with slower starts
        ({"amx_bf16", "avx512_bf16"}, "int8", None, "cpu"),
        ({"avx512_bf16"}, "fp32", None, "cpu"),  # bf16 without AMX: no faster than onnxruntime, measured
        ({"avx2"}, "fp32", None, "cpu"),  # f32 on OpenVINO: no gain
        ({"amx_bf16", "avx512_bf16"}, "fp32", "0", "cpu"),  # fp32 arithmetic asked for
    ],
)
def test_auto_picks_openvino_for_fp32_bundles_on_cpus_with_amx(monkeypatch, flags, precision, switch, expected):
    from edgediff.runtime import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", *flags}))
    if switch is None:
        monkeypatch.delenv(prov.AUTO_OV_ENV, raising=False)
    else:
        monkeypatch.setenv(prov.AUTO_OV_ENV, switch)
    chosen = prov.resolve("auto", precision=precision)
    assert chosen.provider.name == expected
    assert chosen.fallback == (expected == "ov")  # a graph OpenVINO cannot compile runs on the CPU, not an error


def test_auto_runs_an_fp32_bundle_on_openvino_and_an_int8_one_on_onnxruntime(models_root, monkeypatch):
    from edgediff.runtime import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    monkeypatch.delenv(prov.AUTO_OV_ENV, raising=False)
    for precision, expected in (("fp32", "ov"), ("int8", "cpu")):
        with Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root, precision), cache=False) as pipe:
            assert pipe.provider_report()["provider"] == expected, precision


def test_export_precision_auto_is_fp32_where_openvino_runs_it_on_amx(monkeypatch):
    from edgediff.export import ExportOptions
    from edgediff.runtime import cpu_features

    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_vnni", "amx_bf16"}))
    monkeypatch.delenv(prov.AUTO_OV_ENV, raising=False)
    assert ExportOptions(precision="auto").precision == "fp32"
    monkeypatch.setattr(prov.importlib.util, "find_spec", lambda name: None)  # OpenVINO not installed
    assert ExportOptions(precision="auto").precision == "int8-static"
