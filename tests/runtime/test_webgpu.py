"""WebGPU parity: bundles on onnxruntime-webgpu's WebGPU provider against the CPU provider of the same build.

Runs where onnxruntime offers WebGpuExecutionProvider and finds a WebGPU adapter. The main test job has the
CPU build, so there every test here is skipped with that reason. `.ci/webgpu` runs them with onnxruntime-webgpu
on SwiftShader, a software Vulkan device, so that the WebGPU provider's shaders really run on a machine with no
GPU (slowly: seconds per UNet call). The CPU provider's images are checked against diffusers' in
test_parity.py, which ties these to the reference.

EDGEDIFF_WEBGPU_BUNDLES names a folder of more bundles to check (`.ci/webgpu` puts tiny random SD 1.x and
SDXL-Turbo bundles and the shipped model in fp16 there: they need torch to export, which this environment does
not have). EDGEDIFF_REQUIRE_WEBGPU=1 turns a missing adapter into a failure, so that job cannot pass by skipping.
"""

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgediff.runtime import BundleError, Pipeline
from edgediff.runtime import providers as prov
from edgediff.runtime.catalog import resolve_bundle

WEBGPU = "WebGpuExecutionProvider"
SHIPPED = resolve_bundle("shipped")
# WebGPU's shaders against the CPU provider's kernels, same graphs and latents (a pixel is 1/255). Measured on
# SwiftShader: 6.7e-5 to 7.5e-5 on the shipped model's 2-step image
PIXEL_ATOL = 2 / 255
FP16_PIXEL_ATOL = 8 / 255  # half precision's rounding, as in test_cuda.py


def _why_not() -> str | None:
    if WEBGPU not in ort.get_available_providers():
        return "onnxruntime has no WebGPU provider here (needs onnxruntime-webgpu: `.ci/webgpu`)"
    probe = ort.InferenceSession(str(SHIPPED / "text_encoder.onnx"), providers=[WEBGPU, "CPUExecutionProvider"])
    if probe.get_providers()[0] != WEBGPU:  # onnxruntime found no adapter and fell back to the CPU
        return "onnxruntime-webgpu found no WebGPU adapter (no GPU, and no software Vulkan device)"
    return None


REASON = _why_not()
if REASON and os.environ.get("EDGEDIFF_REQUIRE_WEBGPU") == "1":
    pytest.fail(f"EDGEDIFF_REQUIRE_WEBGPU=1 but {REASON}", pytrace=False)
pytestmark = [pytest.mark.hardware, pytest.mark.skipif(REASON is not None, reason=REASON or "")]


def _bundles() -> list[Path]:
    extra = os.environ.get("EDGEDIFF_WEBGPU_BUNDLES")
    found = sorted(p for p in Path(extra).iterdir() if (p / "manifest.json").is_file()) if extra else []
    return [SHIPPED, *found]


def _latents(pipe: Pipeline, seed: int) -> np.ndarray:
    m = pipe.manifest
    shape = (
        1,
        m.latent_channels,
        m.defaults["height"] // m.vae_scale_factor,
        m.defaults["width"] // m.vae_scale_factor,
    )
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _image(pipe: Pipeline, latents: np.ndarray, seed: int = 0) -> np.ndarray:
    # the seed too: LCM and TCD draw fresh noise between steps
    return pipe(
        "a large red circle at the top on a blue background",
        num_inference_steps=2,
        latents=latents,
        seed=seed,
        output_type="np",
    ).images


@pytest.mark.parametrize("bundle", _bundles(), ids=lambda p: p.name)
def test_webgpu_matches_the_cpu_provider(bundle):
    cpu = Pipeline.from_bundle(bundle, provider="cpu")
    precision = cpu.manifest.components["unet"].precision
    try:
        gpu = Pipeline.from_bundle(bundle, provider="webgpu")
    except BundleError as exc:
        if precision == "fp16" and "requires f16" in str(exc):  # the device lacks shader-f16 (SwiftShader does)
            assert "--precision fp32" in str(exc), exc  # and the error says what to do
            pytest.skip(f"this WebGPU device has no shader-f16; the fp16 bundle is refused, naming fp32: {exc}")
        raise
    assert prov.resolve("auto").provider.name == "webgpu"  # the build offers it, so `auto` takes it
    report = gpu.provider_report()["graphs"]
    # every graph runs on WebGPU (one it refused would have run on the CPU and proven nothing), unbound: the
    # Python binding cannot place buffers on a WebGPU device
    assert all(g["providers"][0] == WEBGPU and g["io_binding"] == "off" for g in report.values()), report
    atol = PIXEL_ATOL if precision == "fp32" else FP16_PIXEL_ATOL
    images = []
    for seed in (0, 1):
        latents = _latents(cpu, seed)
        ours, reference = _image(gpu, latents, seed), _image(cpu, latents, seed)
        diff = np.abs(ours - reference).max()
        print(f"{bundle.name} ({precision}) seed {seed}: max |webgpu - cpu| = {diff:.2e}")
        assert diff <= atol
        images.append(ours)
    assert np.abs(images[0] - images[1]).max() > atol  # the comparison can fail


def test_a_second_start_on_webgpu_loads_the_optimised_graphs_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path))
    first = Pipeline.from_bundle(SHIPPED, provider="webgpu")
    latents = _latents(first, 0)
    image = _image(first, latents)
    assert {g["cache"] for g in first.provider_report()["graphs"].values()} == {"miss"}
    first.close()
    again = Pipeline.from_bundle(SHIPPED, provider="webgpu")
    report = again.provider_report()["graphs"]
    assert all(g["cache"] == "hit" and g["providers"][0] == WEBGPU for g in report.values()), report
    assert any("webgpu" in p.name for p in tmp_path.glob("*.onnx"))  # keyed by provider
    assert np.abs(_image(again, latents) - image).max() <= PIXEL_ATOL


def test_providers_command_shows_each_graph_on_webgpu():
    from click.testing import CliRunner

    from edgediff.cli.main import cli

    result = CliRunner().invoke(cli, ["providers", "--model", str(SHIPPED)])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("webgpu") and "<- auto" in line for line in result.output.splitlines()), result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line.startswith("  ")}
    graphs = {name: row for name, row in rows.items() if name != "graph"}
    assert graphs and all(row[0] == "webgpu" for row in graphs.values()), result.output
