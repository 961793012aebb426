"""Tiny random diffusers models and their exported bundles, built once per test session."""

from __future__ import annotations

from pathlib import Path

_CACHE: dict[tuple, Path] = {}


def tiny_source(arch: str, root: Path) -> Path:
    from edgediff.models.random_init import build_random_pipeline

    key = ("source", arch)
    if key not in _CACHE:
        _CACHE[key] = build_random_pipeline(arch, root / f"src-{arch}")
    return _CACHE[key]


# Families trained at another size than their UNet's sample_size (SDXL-Turbo: 512, FLUX: 1024) are exported at
# the tiny models' own size, so that tests stay fast.
TINY_SIZE = {"tiny-sdxl-turbo": 64, "tiny-flux-schnell": 64, "tiny-flux-dev": 64}


def tiny_bundle(arch: str, root: Path, precision: str = "fp32") -> Path:
    from edgediff.export import export_bundle

    key = (precision, arch)
    if key not in _CACHE:
        size = TINY_SIZE.get(arch)
        _CACHE[key] = export_bundle(
            str(tiny_source(arch, root)),
            root / f"bundle-{arch}-{precision}",
            precision=precision,
            progress=False,
            height=size,
            width=size,
        )
    return _CACHE[key]


def tiny_autoencoder_tiny(root: Path, latent_channels: int = 4) -> Path:
    """A random AutoencoderTiny small enough for tests: TAESD-style for the tiny SD models' 4 latent channels and
    2x VAE, or TAESD3-style for tiny SD3's 16 channels and 8x VAE."""
    key = ("source", "autoencoder-tiny", latent_channels)
    if key not in _CACHE:
        import torch
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        blocks = 2 if latent_channels == 4 else 4  # the upsampling matches the model's VAE
        tiny = AutoencoderTiny(
            encoder_block_out_channels=(8,) * blocks,
            decoder_block_out_channels=(8,) * blocks,
            num_encoder_blocks=(1,) * blocks,
            num_decoder_blocks=(1,) * blocks,
            latent_channels=latent_channels,
            upsampling_scaling_factor=2,
        )
        folder = root / ("tiny-autoencoder" if latent_channels == 4 else f"tiny-autoencoder-{latent_channels}")
        tiny.save_pretrained(folder)
        _CACHE[key] = folder
    return _CACHE[key]


def tiny_bundle_with_tiny_decoder(root: Path) -> Path:
    """The tiny SD 1.x bundle with the random tiny decoder beside its full VAE."""
    from edgediff.export import export_bundle

    key = ("fp32", "tiny-sd1", "tiny-decoder")
    if key not in _CACHE:
        _CACHE[key] = export_bundle(
            str(tiny_source("tiny-sd1", root)),
            root / "bundle-sd1-tiny-decoder",
            tiny_decoder=str(tiny_autoencoder_tiny(root)),
            progress=False,
        )
    return _CACHE[key]


def tiny_sd3_bundle(root: Path, t5: bool = True) -> Path:
    """The tiny SD3 model's bundle, with its T5 encoder or without it (`--no-t5`)."""
    from edgediff.export import ExportOptions, export

    key = ("fp32", "tiny-sd3", t5)
    if key not in _CACHE:
        _CACHE[key] = export(
            str(tiny_source("tiny-sd3", root)),
            root / f"bundle-sd3-{'t5' if t5 else 'no-t5'}",
            ExportOptions(t5=t5),
            progress=False,
        )
    return _CACHE[key]


def tiny_controlnet(arch: str, root: Path, seed: int = 0) -> Path:
    """A random ControlNet for `arch`'s UNet, named after its conditioning type ("canny" or "depth" by seed)."""
    from edgediff.models.random_init import build_random_controlnet

    key = ("controlnet", arch, seed)
    if key not in _CACHE:
        kind = ("canny", "depth")[seed % 2]
        _CACHE[key] = build_random_controlnet(arch, root / f"controlnet-{kind}-{arch}-{seed}", seed)
    return _CACHE[key]


def tiny_controlnet_bundle(arch: str, root: Path, count: int = 2) -> Path:
    """`arch`'s bundle with `count` random ControlNets (canny, then depth), at the tiny models' size."""
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions

    key = ("fp32", arch, "controlnets", count)
    if key not in _CACHE:
        size = TINY_SIZE.get(arch)
        controlnets = tuple(str(tiny_controlnet(arch, root, seed)) for seed in range(count))
        options = ExportOptions(height=size, width=size, controlnets=controlnets)
        _CACHE[key] = write_onnx_bundle(
            str(tiny_source(arch, root)), root / f"bundle-{arch}-controlnets-{count}", options, progress=False
        )
    return _CACHE[key]


def tiny_ip_adapter(arch: str, root: Path) -> Path:
    """A random plain IP-Adapter for `arch`'s UNet in h94/IP-Adapter's layout: models/<weights> beside
    models/image_encoder (edgediff.models.random_init.build_random_ip_adapter)."""
    from edgediff.models.random_init import build_random_ip_adapter

    key = ("ip-adapter", arch)
    if key not in _CACHE:
        _CACHE[key] = build_random_ip_adapter(arch, root / f"ip-adapter-{arch}")
    return _CACHE[key]


def tiny_ip_adapter_bundle(arch: str, root: Path) -> Path:
    """`arch`'s bundle with the random IP-Adapter, at the tiny models' size."""
    from edgediff.export.bundle_writer import write_onnx_bundle
    from edgediff.export.options import ExportOptions
    from edgediff.models.random_init import IP_ADAPTER_SUBFOLDER, IP_ADAPTER_WEIGHT_NAME

    key = ("fp32", arch, "ip-adapter")
    if key not in _CACHE:
        size = TINY_SIZE.get(arch)
        weights = tiny_ip_adapter(arch, root) / IP_ADAPTER_SUBFOLDER / IP_ADAPTER_WEIGHT_NAME
        options = ExportOptions(height=size, width=size, ip_adapter=str(weights))
        _CACHE[key] = write_onnx_bundle(
            str(tiny_source(arch, root)), root / f"bundle-{arch}-ip-adapter", options, progress=False
        )
    return _CACHE[key]


def graph_contents(path: Path):
    """An ONNX graph's nodes (type, inputs, outputs) and its weights' bytes by name: what two exports of the same
    graph share, whatever files hold the weights."""
    import onnx

    model = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return nodes, {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}
