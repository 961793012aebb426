"""The tiny decoder (exported, checked against PyTorch, chosen at run time) and tiled decoding."""

import numpy as np
import pytest
from tiny_models import tiny_autoencoder_tiny, tiny_bundle_with_tiny_decoder, tiny_source

from edgediff.benchmarks.metrics import psnr
from edgediff.models.shipped import default_bundle
from edgediff.runtime import Bundle, InputError, Pipeline

TINY_DECODER_ATOL = 1e-4  # fp32 graph vs PyTorch on pixels in [-1, 1]
# Tiled vs whole decode, shipped tiny decoder at 128x128 (32x32 latents, 16-cell tiles, 4 overlap):
# each tile's border pixels lack part of their receptive field; the blend keeps them this close
# (measured 35.1 dB; 8-cell tiles give 25.6 dB).
TILED_PSNR_FLOOR_DB = 30.0


@pytest.fixture(scope="module")
def tiny_decoder_source(models_root):
    return tiny_autoencoder_tiny(models_root)


@pytest.fixture(scope="module")
def bundle_with_tiny(models_root):
    return tiny_bundle_with_tiny_decoder(models_root)


def test_tiny_decoder_is_exported_checked_and_matches_pytorch(bundle_with_tiny, tiny_decoder_source):
    import torch
    from diffusers import AutoencoderTiny

    manifest = Bundle.open(bundle_with_tiny).manifest
    spec = manifest.components["vae_decoder_tiny"]
    assert spec.attributes["scaling_factor"] == 1.0
    assert manifest.provenance["export_check"]["max_rel_diff"]["vae_decoder_tiny"]["sample"] <= 2e-3

    pipe = Pipeline.from_bundle(bundle_with_tiny, provider="cpu")
    assert pipe.decoders == ["full", "tiny"]
    latents = pipe("a photo", seed=0, num_inference_steps=2, output_type="latent").images
    ours = pipe("a photo", seed=0, num_inference_steps=2, output_type="np", decoder="tiny").images
    with torch.no_grad():
        ref = AutoencoderTiny.from_pretrained(tiny_decoder_source).decode(torch.from_numpy(latents)).sample
    ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=TINY_DECODER_ATOL)


def test_decode_turns_returned_latents_into_the_same_images(bundle_with_tiny):
    pipe = Pipeline.from_bundle(bundle_with_tiny, provider="cpu")
    latents = pipe("a photo", seed=0, num_inference_steps=2, output_type="latent").images
    for decoder in ("full", "tiny"):
        whole = pipe("a photo", seed=0, num_inference_steps=2, output_type="np", decoder=decoder).images
        np.testing.assert_array_equal(pipe.decode(latents, decoder=decoder, output_type="np"), whole)
    with pytest.raises(InputError):
        pipe.decode(latents, decoder="huge")


def test_calibration_records_each_decoders_inputs_from_the_same_latents(bundle_with_tiny, monkeypatch):
    """Static int8 calibrates the tiny decoder on what it decodes at run time; recording a second decoder
    repeats the sampling but must not record the UNet's inputs twice."""
    from edgediff.export import calibration
    from edgediff.export.calibration import record_feeds

    monkeypatch.setattr(calibration, "MAX_CALIBRATION_FEEDS", 1000)  # every recorded feed, not a sample
    manifest = Bundle.open(bundle_with_tiny).manifest
    feeds = record_feeds(
        bundle_with_tiny, prompts=["a cat", "a dog"], components=["unet", "vae_decoder", "vae_decoder_tiny"]
    )
    assert len(feeds["unet"]) == 2 * manifest.defaults["steps"]
    assert len(feeds["vae_decoder"]) == len(feeds["vae_decoder_tiny"]) == 2
    for full, tiny in zip(feeds["vae_decoder"], feeds["vae_decoder_tiny"]):
        # the full VAE takes latents / its scaling factor, the tiny decoder latents / 1.0
        np.testing.assert_allclose(
            next(iter(full.values())) * manifest.vae_scaling_factor, next(iter(tiny.values())), rtol=1e-5, atol=1e-6
        )
    assert not np.allclose(
        next(iter(feeds["vae_decoder_tiny"][0].values())), next(iter(feeds["vae_decoder_tiny"][1].values()))
    )


def test_a_tiny_decoder_with_other_latent_channels_is_refused(models_root, tmp_path):
    from diffusers import AutoencoderTiny

    from edgediff.export import export_bundle
    from edgediff.runtime.errors import ExportError

    AutoencoderTiny(
        encoder_block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        num_encoder_blocks=(1,),
        num_decoder_blocks=(1,),
        latent_channels=16,
    ).save_pretrained(tmp_path / "wrong")
    with pytest.raises(ExportError, match="16 latent channels"):
        export_bundle(
            str(tiny_source("tiny-sd1", models_root)),
            tmp_path / "out",
            tiny_decoder=str(tmp_path / "wrong"),
            progress=False,
        )
    assert not (tmp_path / "out").exists()


def test_asking_for_a_decoder_the_bundle_lacks_is_a_clear_error(models_root):
    from tiny_models import tiny_bundle

    with pytest.raises(InputError, match="no tiny decoder"):
        Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu", decoder="tiny")
    with pytest.raises(InputError, match="decoder must be one of"):
        Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu", decoder="taesd")


def test_shipped_tiny_decoder_draws_the_same_scene():
    from training import checker

    pipe = Pipeline.from_bundle(default_bundle(), provider="cpu")
    prompt = "a large red circle on a blue background"
    full = checker.read(pipe(prompt, seed=0).images[0])
    tiny = checker.read(pipe(prompt, seed=0, decoder="tiny").images[0])
    assert (tiny.colour, tiny.background) == (full.colour, full.background)


def test_tile_blending_is_exact_for_a_local_decoder():
    """A decoder with no context beyond its cell (nearest upsampling) must come out identical tiled:
    the ramps of neighbouring tiles sum to one everywhere, at any tile size and uneven edges."""
    from edgediff.runtime import decode

    class Upsampler:
        def run(self, run_options=None, latent_sample=None):
            return [np.repeat(np.repeat(latent_sample[:, :3], 8, 2), 8, 3)]

    latents = np.random.default_rng(0).standard_normal((2, 4, 32, 40)).astype(np.float32)
    whole = decode.decode(Upsampler(), latents)
    for tile, overlap in ((8, None), (12, 5), (31, 3)):
        np.testing.assert_allclose(decode.decode(Upsampler(), latents, tile=tile, overlap=overlap), whole, atol=1e-5)


def test_tiled_decode_matches_whole_decode():
    """The shipped tiny decoder (convolutions only) at 128x128, in 16-cell tiles: no seams.
    (The full VAE's group norms see one tile's statistics, not the image's: with it, use tiles of the
    size the VAE was trained at, 64 cells = 512 px for SD.)"""
    pipe = Pipeline.from_bundle(default_bundle(), provider="cpu")
    kwargs = dict(seed=0, height=128, width=128, output_type="np", decoder="tiny")
    whole = pipe("a small yellow star at the left on a purple background", **kwargs).images
    tiled = pipe("a small yellow star at the left on a purple background", decode_tile=16, **kwargs).images
    assert whole.shape == tiled.shape == (1, 128, 128, 3)
    assert not np.array_equal(whole, tiled)  # it really decoded in tiles
    assert psnr(whole, tiled) >= TILED_PSNR_FLOOR_DB


def test_tile_size_too_small_is_refused():
    pipe = Pipeline.from_bundle(default_bundle(), provider="cpu")
    with pytest.raises(InputError, match="tile size"):
        pipe("a red circle on a blue background", seed=0, decode_tile=2)


def test_decoded_pixels_become_the_images_diffusers_makes():
    """VAE output -> 8-bit images, bit for bit as diffusers' VaeImageProcessor.postprocess (pil and np), for
    in-range and clipped values, float32 and float16 (an fp16 decoder's output, scaled in fp16 by both); the
    NHWC path (inpainting's overlay) gives the same pixels."""
    torch = pytest.importorskip("torch")
    from diffusers.image_processor import VaeImageProcessor

    from edgediff.runtime.image import latents_to_images, to_pil

    rng = np.random.default_rng(0)
    decoded = (rng.standard_normal((2, 3, 24, 40)) * 0.8).astype(np.float32)
    decoded[0, :, 0, :3] = [-1.5, 1.5, 0.0]  # clipped both ways, and the middle
    processor = VaeImageProcessor()
    for array in (decoded, decoded.astype(np.float16)):
        reference = torch.from_numpy(array)
        ours = latents_to_images(array, "pil")
        theirs = processor.postprocess(reference, output_type="pil")
        assert [im.mode for im in ours] == ["RGB", "RGB"] and ours[0].size == (40, 24)
        for a, b in zip(ours, theirs):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(
            latents_to_images(array, "np"), processor.postprocess(reference, output_type="np")
        )
        nhwc = latents_to_images(array, "np")
        for a, b in zip(to_pil(nhwc), ours):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
