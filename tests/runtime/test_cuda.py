"""CUDA parity: the same bundles on onnxruntime's CUDA provider against diffusers and against the CPU provider.

Runs only where onnxruntime offers CUDAExecutionProvider (`pip install "edgediff[cuda]"` on an NVIDIA machine);
CI has no GPU, so there every test here is skipped with that reason. Results from a lent GPU are in
docs/benchmarks.md ("CUDA").
"""

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from references import PIXEL_ATOL, ours_and_diffusers  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Pipeline  # noqa: E402

pytestmark = [
    pytest.mark.hardware,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="onnxruntime has no CUDA provider here (needs onnxruntime-gpu and an NVIDIA GPU)",
    ),
]

# fp16 weights and activations against diffusers' fp32 reference: half precision's rounding, measured on the
# tiny models (a pixel is 1/255 = 0.0039)
FP16_PIXEL_ATOL = 8 / 255

CASES = [
    # arch, precision, sampler, steps, guidance
    ("tiny-sd-turbo", "fp32", "euler", 1, 0.0),
    ("tiny-sd1", "fp32", "euler", 4, 7.5),
    ("tiny-lcm", "fp32", "lcm", 4, 8.0),
    ("tiny-sdxl-turbo", "fp32", "euler", 1, 0.0),
    ("tiny-sd-turbo", "fp16", "euler", 1, 0.0),
    ("tiny-sd1", "fp16", "euler", 4, 7.5),
    ("tiny-sdxl-turbo", "fp16", "euler", 1, 0.0),
]


@pytest.mark.parametrize(
    "arch,precision,sampler,steps,guidance", CASES, ids=[f"{a}-{p}-{s}-{n}" for a, p, s, n, _ in CASES]
)
def test_cuda_matches_diffusers(models_root, monkeypatch, arch, precision, sampler, steps, guidance):
    bundle = tiny_bundle(arch, models_root, precision)
    pipe = Pipeline.from_bundle(bundle, provider="cuda", sampler=sampler)
    report = pipe.provider_report()
    # every graph runs on CUDA (a graph CUDA refused would have run on the CPU and proven nothing)
    assert all(g["providers"][0] == "CUDAExecutionProvider" for g in report["graphs"].values()), report
    ours, theirs = ours_and_diffusers(pipe, tiny_source(arch, models_root), sampler, steps, guidance, monkeypatch)
    atol = PIXEL_ATOL if precision == "fp32" else FP16_PIXEL_ATOL
    diff = np.abs(ours - theirs).max()
    print(f"{arch} {precision} {sampler} {steps} steps on CUDA: max |edgediff - diffusers| = {diff:.2e}")
    assert diff <= atol
    assert np.abs(ours - ours[::-1]).max() > atol  # the comparison can fail


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_matches_cpu_provider(models_root, precision):
    """The same bundle on both providers: differences are kernel rounding only."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root, precision)
    pipes = [Pipeline.from_bundle(bundle, provider=p) for p in ("cuda", "cpu")]
    m = pipes[0].manifest
    side = m.defaults["height"] // m.vae_scale_factor
    latents = np.random.default_rng(0).standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
    images = [pipe("a red circle", num_inference_steps=2, latents=latents, output_type="np").images for pipe in pipes]
    assert np.abs(images[0] - images[1]).max() <= (PIXEL_ATOL if precision == "fp32" else FP16_PIXEL_ATOL)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gpu_optimised_bundle_on_cuda(models_root, tmp_path, monkeypatch, precision):
    """--optimize gpu: the CUDA-only fusions are written, checked on CUDA at export, and the image still
    matches diffusers'."""
    from edgediff.export import export_bundle

    arch, sampler, steps, guidance = "tiny-sd1", "euler", 2, 7.5
    out = export_bundle(
        str(tiny_source(arch, models_root)),
        tmp_path / f"gpu-{precision}",
        precision=precision,
        optimize="gpu",
        progress=False,
    )
    pipe = Pipeline.from_bundle(out, provider="cuda", sampler=sampler)
    m = pipe.manifest
    assert m.provenance["optimized_for"] == "gpu"
    unet = m.components["unet"].attributes["optimizer"]
    print(f"{precision} --optimize gpu: UNet fused {unet.get('fused_ops') or unet.get('skipped')}")
    assert unet.get("fused_ops"), unet
    ours, theirs = ours_and_diffusers(pipe, tiny_source(arch, models_root), sampler, steps, guidance, monkeypatch)
    diff = np.abs(ours - theirs).max()
    print(f"{precision} --optimize gpu on CUDA: max |edgediff - diffusers| = {diff:.2e}")
    assert diff <= (PIXEL_ATOL if precision == "fp32" else FP16_PIXEL_ATOL)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_graphs_replay_each_calls_own_inputs(models_root, precision):
    """--cuda-graph: every graph is captured, and each later call's image is the one an uncaptured, unbound
    pipeline makes from the same latents (a replay that read stale buffers would repeat the first image)."""
    bundle = tiny_bundle("tiny-sd-turbo", models_root, precision)
    plain = Pipeline.from_bundle(bundle, provider="cuda", io_binding=False)
    captured = Pipeline.from_bundle(bundle, provider="cuda", cuda_graph=True)
    m = plain.manifest
    side = m.defaults["height"] // m.vae_scale_factor
    atol = PIXEL_ATOL if precision == "fp32" else FP16_PIXEL_ATOL
    images = []
    for seed in range(4):  # onnxruntime runs a graph uncaptured before it captures it: later calls replay
        latents = np.random.default_rng(seed).standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
        pair = [
            p(f"a red circle {seed}", num_inference_steps=2, latents=latents, output_type="np").images
            for p in (plain, captured)
        ]
        diff = np.abs(pair[0] - pair[1]).max()
        print(f"{precision} call {seed}: max |captured - plain| = {diff:.2e}")
        assert diff <= atol
        images.append(pair[1])
    assert np.abs(images[-1] - images[-2]).max() > atol  # the calls differ, so a stale replay would be caught
    report = captured.provider_report()["graphs"]
    print({name: g["cuda_graph"] for name, g in report.items()})
    assert all(g["cuda_graph"].startswith("captured") for g in report.values()), report
    assert all(captured.sessions.get(name).runner.replays >= 2 for name in report)

    # a second start: each shape-fixed graph comes from the graph cache, and is captured again
    captured.close()
    again = Pipeline.from_bundle(bundle, provider="cuda", cuda_graph=True)
    for seed in (0, 1, 2):
        latents = np.random.default_rng(seed).standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
        diff = np.abs(
            again(f"a red circle {seed}", num_inference_steps=2, latents=latents, output_type="np").images
            - images[seed]
        ).max()
        print(f"{precision} cached capture, call {seed}: max |diff| = {diff:.2e}")
        assert diff <= atol
    report = again.provider_report()["graphs"]
    assert all(g["cache"] == "hit" and g["cuda_graph"].startswith("captured") for g in report.values()), report
