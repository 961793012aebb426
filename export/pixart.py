"""PixArt-Sigma's graphs for optimum's exporter: its diffusers mapping has no PixArt transformer, so the export
configs are set up here on optimum's own classes, as for SANA (sana.py); tracing, checks and the bundle are the other
families'.

T5: optimum's T5 encoder config with the attention mask added (PixArtSigmaPipeline masks the padding). The
transformer: SANA's input set (hidden_states, encoder_hidden_states, encoder_attention_mask, timestep); its output
keeps the learned-variance channels, which the runtime drops as the pipeline does. The SD VAE: optimum's decoder
config; no encoder (PixArt bundles do text-to-image only).
"""

from __future__ import annotations

import copy

from .sana import transformer_config

PIXART_TRANSFORMER = "PixArtTransformer2DModel"
# PixArtSigmaPipeline's own max_sequence_length: the T5 tokens the transformer sees
PIXART_MAX_SEQUENCE_LENGTH = 300


def is_pixart(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == PIXART_TRANSFORMER


def _t5_config(text_encoder):
    from optimum.exporters.onnx.model_configs import T5EncoderOnnxConfig

    class MaskedT5Config(T5EncoderOnnxConfig):
        @property
        def inputs(self):
            return {**super().inputs, "attention_mask": {0: "batch_size", 1: "sequence_length"}}

    return MaskedT5Config(text_encoder.config, task="feature-extraction")


def pixart_models_for_export(pipe) -> dict:
    """{component: (module, optimum export config)}, as optimum's get_diffusion_models_for_export returns them."""
    from optimum.exporters.onnx.model_configs import VaeDecoderOnnxConfig

    decoder = copy.deepcopy(pipe.vae)
    decoder.forward = lambda latent_sample: decoder.decode(z=latent_sample)
    return {
        "text_encoder": (pipe.text_encoder, _t5_config(pipe.text_encoder)),
        "transformer": (pipe.transformer, transformer_config(pipe.transformer)),
        "vae_decoder": (decoder, VaeDecoderOnnxConfig(pipe.vae.config, task="semantic-segmentation")),
    }
