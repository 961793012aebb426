"""QNN (Snapdragon NPUs): an int8 bundle on onnxruntime-qnn's HTP backend against the CPU provider.

onnxruntime-qnn 2 is a plugin beside the CPU build (the `dev` extra installs it on x86-64 Linux and Windows).
On x86-64 its HTP backend is Qualcomm's simulator of the NPU, so the graphs the NPU would run, with its int8
arithmetic, run here too, slowly (about 6 s per UNet call of the shipped model). Real Snapdragon machines are
not checked. The CPU provider's images are themselves checked against diffusers (test_parity.py).
"""

import numpy as np
import pytest

pytest.importorskip("onnxruntime_qnn")
pytestmark = pytest.mark.hardware  # an NPU, here Qualcomm's simulator of one

from edgediff.benchmarks.metrics import psnr
from edgediff.runtime import Pipeline  # noqa: E402

QNN = "QNNExecutionProvider"
# The x86-64 simulator needs a target chip (without one, finalising a graph failed with QNN_COMMON_ERROR_MEM_ALLOC);
# a Snapdragon machine detects its own
SIMULATED_CHIP = {"soc_model": "60", "htp_arch": "73"}
# The NPU's int8 kernels against the CPU provider's QDQ arithmetic, same int8-static bundle, latents and seed
# (a pixel-exact match is not expected). Measured on the shipped model: this prompt 48.2-49.3 dB at 2 steps (seeds
# 0, 1); "a large red circle on a blue background" 34.2 and 44.9 dB at 2 steps, 44.3-44.9 dB at 4
QNN_PSNR_FLOOR_DB = 30.0


@pytest.fixture(scope="module")
def shipped_int8(tmp_path_factory):
    from edgediff.export import export_bundle

    return export_bundle(
        "models/shipped/diffusers",
        tmp_path_factory.mktemp("qnn") / "shipped-int8-static",
        precision="int8-static",
        progress=False,
    )


def test_qnn_runs_every_graph_shape_fixed_on_the_npu_close_to_the_cpu(shipped_int8):
    cpu = Pipeline.from_bundle(shipped_int8, provider="cpu")
    npu = Pipeline.from_bundle(shipped_int8, provider="qnn", provider_options=SIMULATED_CHIP)
    m = cpu.manifest
    side = m.defaults["height"] // m.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
    kwargs = dict(num_inference_steps=2, latents=latents, seed=0, output_type="np")
    reference = cpu("a large red circle at the top on a blue background", **kwargs).images
    ours = npu("a large red circle at the top on a blue background", **kwargs).images
    report = npu.provider_report()["graphs"]
    # the plugin was registered and handed over (given by name, onnxruntime runs everything on the CPU), and each
    # graph was opened for its shapes (with symbolic ones the NPU validated next to nothing)
    assert all(g["providers"][0] == QNN and g["shapes"].startswith("fixed") for g in report.values()), report
    score = psnr(ours, reference)
    print(f"QNN (HTP simulator) against the CPU provider: {score:.1f} dB, max {np.abs(ours - reference).max():.3f}")
    assert score >= QNN_PSNR_FLOOR_DB
    assert psnr(ours, reference[:, ::-1]) < QNN_PSNR_FLOOR_DB  # the comparison can fail
    # onnxruntime lists the provider even where it took no node: an image that differs from the CPU's shows the
    # NPU's arithmetic ran
    assert np.abs(ours - reference).max() > 1e-3

    # what QNN compiled was kept as EPContext models in the graph cache: the next start loads them, no compiler
    assert {g["cache"] for g in report.values()} == {"miss"}
    npu.close()
    again = Pipeline.from_bundle(shipped_int8, provider="qnn", provider_options=SIMULATED_CHIP)
    image = again("a large red circle at the top on a blue background", **kwargs).images
    report = again.provider_report()["graphs"]
    assert all(g["cache"] == "hit" and g["providers"][0] == QNN for g in report.values()), report
    assert np.abs(image - ours).max() <= 1e-6
