"""SANA and SANA-Sprint's graphs for optimum's exporter: its diffusers mapping knows neither Gemma-2 as a diffusion
text encoder, nor SANA-Sprint's guidance input, nor DC-AE (AutoencoderDC), so the export configs are set up here,
on optimum's own classes, and the rest of the export (tracing, checks, bundle) is the other families'.

Gemma-2: optimum's text-encoder config with the instruction prefix's keys and values as inputs (gemma_prefix.py:
the prefix is computed once, at export). The transformer: optimum's
SANA config (hidden_states, encoder_hidden_states, encoder_attention_mask, timestep), with `guidance` added when the
transformer embeds it (Sprint). DC-AE: the decoder, and for Sprint the encoder too, for image-to-image
(SanaSprintImg2ImgPipeline; SANA itself has no image-to-image pipeline). The encoder is deterministic, so its graph
gives the latent itself (`latent`), not a distribution's parameters.
"""

from __future__ import annotations

import copy

SANA_TRANSFORMER = "SanaTransformer2DModel"
# SanaPipeline's own max_sequence_length: the Gemma tokens the transformer sees (the instruction prefix aside)
SANA_MAX_SEQUENCE_LENGTH = 300


def is_sana(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == SANA_TRANSFORMER


def dc_ae_scale_factor(vae) -> int:
    """Pixels per latent cell along each side: 2 ** (stages - 1), as SanaPipeline reads it (32 for DC-AE f32)."""
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def transformer_config(transformer):
    """optimum's SANA transformer config for `transformer`'s inputs (PixArt's take the same set)."""
    from optimum.exporters.onnx.model_configs import SanaTransformerOnnxConfig
    from optimum.utils import DummyInputGenerator, NormalizedConfig

    class GuidanceInputGenerator(DummyInputGenerator):
        """SANA-Sprint's guidance (the scale times guidance_embeds_scale), one per batch row."""

        SUPPORTED_INPUT_NAMES = ("guidance",)

        def __init__(self, task, normalized_config, batch_size: int = 2, **kwargs):
            self.batch_size = batch_size

        def generate(self, input_name, framework="pt", int_dtype="int64", float_dtype="fp32"):
            return self.random_float_tensor([self.batch_size], max_value=1, framework=framework, dtype=float_dtype)

    guidance = bool(transformer.config.get("guidance_embeds", False))

    class SanaConfig(SanaTransformerOnnxConfig):
        # optimum's own reads fields SANA's config lacks (its dummies' vocabulary bounds the random timesteps)
        NORMALIZED_CONFIG_CLASS = NormalizedConfig.with_args(
            image_size="sample_size",
            num_channels="in_channels",
            hidden_size="caption_channels",
            vocab_size="attention_head_dim",
            allow_new=True,
        )
        DUMMY_INPUT_GENERATOR_CLASSES = (
            *SanaTransformerOnnxConfig.DUMMY_INPUT_GENERATOR_CLASSES,
            GuidanceInputGenerator,
        )

        @property
        def inputs(self):
            inputs = super().inputs
            if guidance:
                inputs["guidance"] = {0: "batch_size"}
            return inputs

    return SanaConfig(transformer.config, task="semantic-segmentation")


def _decoder_config(vae):
    from optimum.exporters.onnx.model_configs import VaeDecoderOnnxConfig

    factor = dc_ae_scale_factor(vae)

    class DCAEDecoderConfig(VaeDecoderOnnxConfig):
        @property
        def outputs(self):  # optimum's counts up_block_types, which DC-AE's config names otherwise
            return {"sample": {0: "batch_size", 2: f"latent_height * {factor}", 3: f"latent_width * {factor}"}}

    return DCAEDecoderConfig(vae.config, task="semantic-segmentation")


def _encoder_config(vae):
    from optimum.exporters.onnx.model_configs import VaeEncoderOnnxConfig

    factor = dc_ae_scale_factor(vae)

    class DCAEEncoderConfig(VaeEncoderOnnxConfig):
        @property
        def outputs(self):  # the latent itself (no latent_dist); optimum's counts down_block_types, which DC-AE lacks
            return {"latent": {0: "batch_size", 2: f"sample_height / {factor}", 3: f"sample_width / {factor}"}}

    return DCAEEncoderConfig(vae.config, task="semantic-segmentation")


def sana_models_for_export(pipe) -> dict:
    """{component: (module, optimum export config)}, as optimum's get_diffusion_models_for_export returns them."""
    from .gemma_prefix import prefixed_text_encoder

    decoder = copy.deepcopy(pipe.vae)
    decoder.forward = lambda latent_sample: decoder.decode(latent_sample)
    models = {
        # Gemma-2 after the instruction prefix, whose keys and values the bundle stores (gemma_prefix.py)
        "text_encoder": prefixed_text_encoder(pipe.text_encoder),
        "transformer": (pipe.transformer, transformer_config(pipe.transformer)),
        "vae_decoder": (decoder, _decoder_config(pipe.vae)),
    }
    if pipe.transformer.config.get("guidance_embeds", False):  # Sprint, as the manifest's guidance_embedding says
        encoder = copy.deepcopy(pipe.vae)
        encoder.forward = lambda sample: {"latent": encoder.encode(sample).latent}
        models["vae_encoder"] = (encoder, _encoder_config(pipe.vae))
    return models


def models_for_export(pipe) -> dict:
    """The modules and optimum export configs of `pipe`'s graphs: SANA's from here, PixArt's from pixart.py, the
    others' from optimum."""
    from .pixart import is_pixart, pixart_models_for_export  # pixart.py builds on this module's configs

    if is_sana(pipe):
        return sana_models_for_export(pipe)
    if is_pixart(pipe):
        return pixart_models_for_export(pipe)
    from optimum.exporters.utils import get_diffusion_models_for_export

    return get_diffusion_models_for_export(pipe, exporter="onnx")
