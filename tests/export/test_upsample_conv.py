"""Nearest 2x upsampling + 3x3 convolution rewritten as four 2x2 convolutions and a DepthToSpace
(export/upsample_conv.py): the same output as PyTorch's module, from 4/9 of the multiply-adds, and only
where the rewrite is exact."""

import numpy as np
import pytest

# float32 sums of up to four taps in a new order: a few ulps of the outputs' scale
REWRITE_TOLERANCE = 1e-5


def _export(module, path, channels: int):
    import torch

    x = torch.zeros(1, channels, 5, 7)
    torch.onnx.export(
        module,
        (x,),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
        opset_version=18,
        dynamo=False,
    )
    import onnx

    return onnx.load(str(path))


def _up_conv(cin=6, cout=5, bias=True, mode="nearest", stride=1, groups=1, also_return_upsampled=False):
    import torch
    import torch.nn.functional as F

    class UpConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=bias, stride=stride, groups=groups)

        def forward(self, x):
            up = F.interpolate(x, scale_factor=2.0, mode=mode)
            return (self.conv(up), up) if also_return_upsampled else self.conv(up)

    torch.manual_seed(0)
    return UpConv().eval()


def _run(model, x):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 6, 5, 7), (2, 6, 4, 4), (1, 6, 1, 3)])  # odd sides, a batch, one row
def test_rewritten_graph_equals_pytorch(tmp_path, bias, shape):
    import torch

    from edgediff.export.upsample_conv import subpixel_upsample_convs

    module = _up_conv(bias=bias)
    model = _export(module, tmp_path / "up.onnx", channels=6)
    assert subpixel_upsample_convs(model, min_channels=1) == 1
    ops = [n.op_type for n in model.graph.node]
    assert "Resize" not in ops and ops.count("Conv") == 4 and "DepthToSpace" in ops
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    got = _run(model, x)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=REWRITE_TOLERANCE * max(1.0, np.abs(expected).max()))


def test_phase_kernels_sum_the_taps_each_phase_sees():
    from edgediff.export.upsample_conv import phase_kernels

    weight = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)  # rows 0-2, 3-5, 6-8
    kernels = phase_kernels(weight)
    # phase (0, 0): its window's first row and column take the kernel's first; the second take the rest
    np.testing.assert_array_equal(kernels[0, 0][0, 0], [[0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]])
    np.testing.assert_array_equal(kernels[1, 1][0, 0], [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]])
    assert all(k.dtype == np.float32 and k.shape == (1, 1, 2, 2) for k in kernels.values())
    assert sum(k.sum() for k in kernels.values()) == 4 * weight.sum()  # each tap lands in every phase once


def test_rewrite_takes_four_ninths_of_the_multiply_adds(tmp_path):
    import onnx

    from edgediff.benchmarks.macs import count_macs
    from edgediff.export.upsample_conv import subpixel_upsample_convs

    model = _export(_up_conv(cin=8, cout=8), tmp_path / "up.onnx", channels=8)
    before = count_macs(tmp_path / "up.onnx", {"x": (1, 8, 16, 16)})["total"]
    subpixel_upsample_convs(model, min_channels=1)
    onnx.save(model, str(tmp_path / "sub.onnx"))
    after = count_macs(tmp_path / "sub.onnx", {"x": (1, 8, 16, 16)})["total"]
    assert before == 8 * 8 * 9 * 32 * 32 and after * 9 == before * 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "bilinear"},  # not a copy of each pixel: no 2x2 window
        {"stride": 2},
        {"groups": 2, "cout": 6},
        {"also_return_upsampled": True},  # the upsampled image is needed as well
    ],
)
def test_other_graphs_stay_as_they_are(tmp_path, kwargs):
    from edgediff.export.upsample_conv import subpixel_upsample_convs

    model = _export(_up_conv(**kwargs), tmp_path / "up.onnx", channels=6)
    before = [n.op_type for n in model.graph.node]
    assert subpixel_upsample_convs(model, min_channels=1) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_rewrite_leaves_no_unused_weights_or_constants(tmp_path):
    from edgediff.export.upsample_conv import subpixel_upsample_convs

    model = _export(_up_conv(), tmp_path / "up.onnx", channels=6)
    subpixel_upsample_convs(model, min_channels=1)
    used = {name for node in model.graph.node for name in node.input}
    assert all(t.name in used for t in model.graph.initializer)
    assert all(n.output[0] in used for n in model.graph.node if n.op_type == "Constant")


def test_narrow_convolutions_stay_as_they_are(tmp_path):
    from edgediff.export.upsample_conv import MIN_CHANNELS, subpixel_upsample_convs

    narrow = _export(_up_conv(cin=MIN_CHANNELS - 1, cout=MIN_CHANNELS), tmp_path / "narrow.onnx", MIN_CHANNELS - 1)
    assert subpixel_upsample_convs(narrow) == 0
    wide = _export(_up_conv(cin=MIN_CHANNELS, cout=MIN_CHANNELS), tmp_path / "wide.onnx", MIN_CHANNELS)
    assert subpixel_upsample_convs(wide) == 1


def _upsamplers(module) -> int:
    """Nearest 2x upsamplings with a 3x3 convolution after them, in a diffusers module."""
    import torch
    from diffusers.models.upsampling import Upsample2D

    plain = sum(isinstance(m, Upsample2D) and m.use_conv and m.interpolate for m in module.modules())
    # AutoencoderTiny: nn.Upsample followed by a convolution in one Sequential
    layers = [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]
    tiny = sum(
        isinstance(a, torch.nn.Upsample) and isinstance(b, torch.nn.Conv2d) for s in layers for a, b in zip(s, s[1:])
    )
    return plain + tiny


def test_rewritten_bundle_matches_diffusers(models_root, tmp_path, monkeypatch):
    """The tiny SD model's convolutions are narrower than MIN_CHANNELS: exported with the rewrite made at any
    width, its UNet, VAE decoder and tiny decoder are rewritten at every upsampling, the manifest counts them, and
    the pipeline's images stay within 2/255 of diffusers' from the same latents."""
    import json

    from diffusers import AutoencoderKL, AutoencoderTiny, UNet2DConditionModel
    from references import PIXEL_ATOL, ours_and_diffusers
    from tiny_models import tiny_autoencoder_tiny, tiny_bundle, tiny_bundle_with_tiny_decoder, tiny_source

    from edgediff.export import export_bundle, upsample_conv
    from edgediff.runtime import Pipeline

    source = tiny_source("tiny-sd1", models_root)
    as_shipped = json.loads((tiny_bundle("tiny-sd1", models_root) / "manifest.json").read_text())["components"]
    assert not any("rewrites" in c.get("attributes", {}) for c in as_shipped.values())  # all narrower
    monkeypatch.setattr(upsample_conv, "MIN_CHANNELS", 1)
    bundle = export_bundle(
        str(source), tmp_path / "rewritten", tiny_decoder=str(tiny_autoencoder_tiny(models_root)), progress=False
    )
    components = json.loads((bundle / "manifest.json").read_text())["components"]
    expected = {
        "unet": _upsamplers(UNet2DConditionModel.from_pretrained(source / "unet")),
        "vae_decoder": _upsamplers(AutoencoderKL.from_pretrained(source / "vae").decoder),
        "vae_decoder_tiny": _upsamplers(AutoencoderTiny.from_pretrained(tiny_autoencoder_tiny(models_root)).decoder),
        "vae_encoder": 0,
        "text_encoder": 0,
    }
    assert expected["unet"] > 0 and expected["vae_decoder"] > 0 and expected["vae_decoder_tiny"] > 0
    for name, count in expected.items():
        rewrites = components[name].get("attributes", {}).get("rewrites", {})
        assert rewrites.get("subpixel_upsample_convs", 0) == count, name
    with Pipeline.from_bundle(bundle, provider="cpu", sampler="euler") as pipe:
        ours, theirs = ours_and_diffusers(pipe, source, "euler", 2, 7.5, monkeypatch)
        assert np.abs(ours - theirs).max() <= PIXEL_ATOL
        assert np.abs(ours - ours[::-1]).max() > PIXEL_ATOL  # different prompts, different images: it can fail
        # the tiny decoder against the same decoder as traced (diffusers' pipeline decodes with the full VAE)
        latents = np.random.default_rng(3).standard_normal((2, 4, 8, 8)).astype(np.float32)
        rewritten = pipe.decode(latents, decoder="tiny", output_type="np")
    with Pipeline.from_bundle(tiny_bundle_with_tiny_decoder(models_root), provider="cpu") as traced:
        assert np.abs(rewritten - traced.decode(latents, decoder="tiny", output_type="np")).max() <= PIXEL_ATOL
