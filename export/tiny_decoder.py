"""The optional tiny decoder (AutoencoderTiny, as TAESD is to SD): loaded from a folder or hub id and
exported with optimum's exporter through a spec for it, since optimum has none of its own.
"""

from __future__ import annotations

import copy

from edgediff.runtime.errors import ExportError

TINY_COMPONENT = "vae_decoder_tiny"


def load_tiny_decoder(source: str, latent_channels: int):
    """AutoencoderTiny from a local folder or a hub id (a `vae` subfolder is looked into too)."""
    from pathlib import Path

    from diffusers import AutoencoderTiny

    try:
        local = Path(source)
        sub = "vae" if (local / "vae" / "config.json").is_file() else None
        tiny = AutoencoderTiny.from_pretrained(source, subfolder=sub)
    except (OSError, ValueError) as exc:
        raise ExportError(
            "export_source", source=source, detail=f"not an AutoencoderTiny: {str(exc).splitlines()[0]}"
        ) from None
    if tiny.config.latent_channels != latent_channels:
        raise ExportError(
            "export_source",
            source=source,
            detail=f"tiny decoder takes {tiny.config.latent_channels} latent channels, the model makes {latent_channels}",
        )
    return tiny.float().eval()


def tiny_decoder_for_export(tiny):
    """(module, optimum export config) for optimum's export_models, as optimum pairs its own VAE decoder."""
    from optimum.exporters.onnx.model_configs import VaeDecoderOnnxConfig

    class TinyDecoderOnnxConfig(VaeDecoderOnnxConfig):
        # AutoencoderTiny's config has no up_block_types: its upsampling is stated directly
        @property
        def outputs(self):
            cfg = self._config
            factor = cfg.upsampling_scaling_factor ** (len(cfg.decoder_block_out_channels) - 1)
            return {"sample": {0: "batch_size", 2: f"latent_height * {factor}", 3: f"latent_width * {factor}"}}

    module = copy.deepcopy(tiny)
    module.forward = lambda latent_sample: module.decode(latent_sample)
    return module, TinyDecoderOnnxConfig(tiny.config, task="semantic-segmentation")


def tiny_attributes(tiny) -> dict:
    # the runtime divides the pipeline's latents by this before the tiny decoder (TAESD's is 1.0)
    return {"scaling_factor": float(tiny.config.scaling_factor), "source_class": type(tiny).__name__}
