"""Declarative per-component export specs (as optimum keeps one OnnxConfig per model part).

Each spec says which module of the diffusers pipeline it takes, how to call it in PyTorch for the
check, and random inputs for that check. The ONNX graph itself comes from optimum's exporter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgediff.runtime.denoisers.sd3 import TEXT_LOG_COUNTS, text_log_counts

# Export checks: max |onnx - torch| / max(1, max |torch|) per output, on random inputs.
FP32_TOLERANCE = 2e-3  # fp32 kernels differ in summation order and fused attention; 1e-4 is typical on tiny models
FP16_TOLERANCE = 5e-2  # fp16 graphs keep fp32 I/O; half-precision accumulations across a full UNet
TOLERANCES = {"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE}
VALIDATION_BATCH = 2  # a batch of two catches graphs that baked batch 1 in
# Graphs with dynamic spatial axes are checked on a smaller latent grid than the bundle's: each side a
# quarter, in multiples of 8 cells (three 2x downsamplings stay whole), at least 8 cells, never more than
# the bundle's own. The same graph runs at every size; the check's cost falls with the grid's area.
CHECK_SIDE_FRACTION = 4
CHECK_CELL_MULTIPLE = 8


@dataclass(frozen=True)
class ExportContext:
    height: int
    width: int
    latent_channels: int  # the VAE's
    unet_in_channels: int  # = latent_channels, or 9 for inpainting UNets (latents + mask + masked image)
    vae_scale_factor: int
    vae_scaling_factor: float  # the decoder sees latents / this: SDXL's 0.13025 makes them ~7.7x larger
    max_length: int
    vocab_size: int
    cross_attention_dim: int
    time_cond_proj_dim: int | None
    # SDXL: the second text encoder's vocabulary, its pooled (projected) width and the micro-conditions count
    vocab_size_2: int | None = None
    pooled_dim: int | None = None
    time_ids_dim: int | None = None  # 6: original size, crop top-left, target size (5 for the refiner)
    # SD3: T5's vocabulary (None when T5 is left out) and the T5 tokens that follow CLIP's in the joint sequence
    vocab_size_3: int | None = None
    max_sequence_length: int | None = None
    # SD3 without T5: the transformer takes the zero T5 tokens as one, with text_log_counts (export/counted_text.py)
    counted_text: bool = False
    # FLUX: the second encoder is T5 and takes this many tokens (None: CLIP's max_length); latents reach the
    # transformer packed as packing x packing patches, with position ids; dev's transformer embeds the guidance
    text_2_length: int | None = None
    packing: int = 1
    guidance_embeds: bool = False
    # SANA: Gemma-2 takes an attention mask with its tokens, and the transformer the same mask over the text tokens
    # (max_sequence_length of them, caption width cross_attention_dim); Sprint embeds guidance too
    attention_mask: bool = False
    # SANA: Gemma-2 runs after a cached prefix: (layers, key-value heads, head dim) of its keys and values
    # (export/gemma_prefix.py); None for other text encoders
    text_prefix: tuple[int, int, int] | None = None
    # bundles with ControlNets: (level, channels) of each residual the UNet takes (down ones, then the mid one),
    # level counting the downsamplings below the latent grid (export/controlnet.py); () without ControlNets
    controlnet_residuals: tuple[tuple[int, int], ...] = ()
    # SD3: the residuals are the transformer's block samples, (batch, tokens, channels) with a token per 2**level
    # latent cells a side
    controlnet_tokens: bool = False
    # FLUX: the last this many of them are the single-stream blocks' samples, the others the double-stream blocks'
    controlnet_single_blocks: int = 0
    # bundles with an IP-Adapter: the width of the image embeddings the UNet takes with its scale
    # (export/ip_adapter.py); None without one
    ip_adapter_embeds_dim: int | None = None
    # IP-Adapter Plus: the encoder's hidden-state tokens per image the UNet takes; None: one embedding per image
    ip_adapter_embeds_length: int | None = None


@dataclass(frozen=True)
class ComponentExport:
    name: str  # bundle component name and optimum's submodel key
    torch_call: Callable  # (pipeline, inputs as torch tensors) -> list of torch outputs, in graph output order
    random_inputs: Callable[[ExportContext, np.random.Generator], dict[str, np.ndarray]]
    # Lesson 3 of FIELD_NOTES (the SDXL VAE overflows in fp16): tried in fp16 in fp16 bundles, kept fp32, with
    # the reason in the manifest, when the fp16 graph fails its check; other components' failures are errors
    # (text encoders: by the model they hold, may_overflow_fp16)
    fp16_may_overflow: bool = False
    # the pipeline attribute whose weights the torch_call reads; freed after the last component using it
    module: str | None = None


def _padding_mask(rng, length: int) -> np.ndarray:
    """(batch, length) right-padded attention masks, rows of differing lengths (the first full)."""
    kept = np.concatenate([[length], rng.integers(1, length + 1, VALIDATION_BATCH - 1)])
    return (np.arange(length)[None, :] < kept[:, None]).astype(np.int64)


def _text_inputs(ctx: ExportContext, rng):
    if ctx.text_prefix:  # SANA's Gemma-2: a random prefix, then padded prompts with their mask
        from .gemma_prefix import random_prefixed_inputs

        return random_prefixed_inputs(rng, VALIDATION_BATCH, ctx.max_length, ctx.text_prefix, ctx.vocab_size)
    inputs = {"input_ids": rng.integers(0, ctx.vocab_size, (VALIDATION_BATCH, ctx.max_length), dtype=np.int64)}
    if ctx.attention_mask:  # T5 (PixArt): padded prompts with their mask
        inputs["attention_mask"] = _padding_mask(rng, ctx.max_length)
    return inputs


def _text_2_inputs(ctx: ExportContext, rng):
    length = ctx.text_2_length or ctx.max_length  # FLUX's second encoder is T5
    return {"input_ids": rng.integers(0, ctx.vocab_size_2, (VALIDATION_BATCH, length), dtype=np.int64)}


def _text_3_inputs(ctx: ExportContext, rng):
    shape = (VALIDATION_BATCH, ctx.max_sequence_length)
    return {"input_ids": rng.integers(0, ctx.vocab_size_3, shape, dtype=np.int64)}


def _flux_transformer_inputs(ctx: ExportContext, rng):
    """FLUX's inputs as FluxPipeline feeds them: packed latents, T5's tokens alone, CLIP-L's pooled text, the
    timestep as sigma (t / 1000), position ids (0, row, col) per image token and zeros per text token; dev adds
    the guidance scale (its transformer scales timestep and guidance by 1000 itself)."""
    rows, cols = ctx.height // ctx.vae_scale_factor // ctx.packing, ctx.width // ctx.vae_scale_factor // ctx.packing
    width = ctx.latent_channels * ctx.packing**2
    image_ids = np.zeros((rows, cols, 3), dtype=np.int64)
    image_ids[..., 1], image_ids[..., 2] = np.arange(rows)[:, None], np.arange(cols)[None, :]
    inputs = {
        "hidden_states": rng.standard_normal((VALIDATION_BATCH, rows * cols, width)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (VALIDATION_BATCH, ctx.max_sequence_length, ctx.cross_attention_dim)
        ).astype(np.float32),
        "pooled_projections": rng.standard_normal((VALIDATION_BATCH, ctx.pooled_dim)).astype(np.float32),
        "timestep": rng.uniform(0, 1, (VALIDATION_BATCH,)).astype(np.float32),
        "img_ids": image_ids.reshape(rows * cols, 3),
        "txt_ids": np.zeros((ctx.max_sequence_length, 3), dtype=np.int64),
    }
    if ctx.guidance_embeds:
        inputs["guidance"] = rng.uniform(1, 10, (VALIDATION_BATCH,)).astype(np.float32)
    if ctx.controlnet_residuals:  # a bundle with ControlNets: their block samples
        from .controlnet import residual_inputs

        inputs.update(residual_inputs(ctx, rng))
    return inputs


def _sana_transformer_inputs(ctx: ExportContext, rng):
    """SANA's inputs as SanaPipeline feeds them: latents, Gemma's selected hidden states with their mask, the
    timestep (SANA: t * timestep_scale, up to 1000; Sprint: the flow time in [0, 1]) and Sprint's guidance."""
    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    tokens = ctx.max_sequence_length
    inputs = {
        "hidden_states": rng.standard_normal((VALIDATION_BATCH, ctx.latent_channels, h, w)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((VALIDATION_BATCH, tokens, ctx.cross_attention_dim)).astype(
            np.float32
        ),
        "encoder_attention_mask": _padding_mask(rng, tokens),
        "timestep": rng.uniform(0, 1 if ctx.guidance_embeds else 1000, (VALIDATION_BATCH,)).astype(np.float32),
    }
    if ctx.guidance_embeds:  # 4.5 x guidance_embeds_scale (0.1) by default
        inputs["guidance"] = rng.uniform(0, 1, (VALIDATION_BATCH,)).astype(np.float32)
    return inputs


def _transformer_inputs(ctx: ExportContext, rng):
    if ctx.packing > 1:
        return _flux_transformer_inputs(ctx, rng)
    if ctx.attention_mask:
        return _sana_transformer_inputs(ctx, rng)
    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    # CLIP's tokens, then T5's (zeros without T5: one token standing for them all when counted)
    tokens = ctx.max_length + (1 if ctx.counted_text else ctx.max_sequence_length)
    inputs = {
        "hidden_states": rng.standard_normal((VALIDATION_BATCH, ctx.latent_channels, h, w)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((VALIDATION_BATCH, tokens, ctx.cross_attention_dim)).astype(
            np.float32
        ),
        "pooled_projections": rng.standard_normal((VALIDATION_BATCH, ctx.pooled_dim)).astype(np.float32),
        # flow timesteps are sigma * 1000, one per batch row as StableDiffusion3Pipeline passes them
        "timestep": rng.uniform(1, 1000, (VALIDATION_BATCH,)).astype(np.float32),
    }
    if ctx.controlnet_residuals:  # a bundle with ControlNets: their block samples
        from .controlnet import residual_inputs

        inputs.update(residual_inputs(ctx, rng))
    if ctx.counted_text:  # the last (random, not zero: any repeated token) stands for max_sequence_length of them
        inputs[TEXT_LOG_COUNTS] = text_log_counts(VALIDATION_BATCH, tokens, ctx.max_sequence_length)
    return inputs


def _unet_inputs(ctx: ExportContext, rng):
    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    inputs = {
        "sample": rng.standard_normal((VALIDATION_BATCH, ctx.unet_in_channels, h, w)).astype(np.float32),
        "timestep": np.array(rng.integers(1, 1000), dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (VALIDATION_BATCH, ctx.max_length, ctx.cross_attention_dim)
        ).astype(np.float32),
    }
    if ctx.time_cond_proj_dim is not None:
        inputs["timestep_cond"] = rng.standard_normal((VALIDATION_BATCH, ctx.time_cond_proj_dim)).astype(np.float32)
    if ctx.pooled_dim is not None:  # SDXL's added conditions, at the magnitudes they take at run time
        inputs["text_embeds"] = rng.standard_normal((VALIDATION_BATCH, ctx.pooled_dim)).astype(np.float32)
        inputs["time_ids"] = np.tile(
            np.array([ctx.height, ctx.width, 0, 0, ctx.height, ctx.width][: ctx.time_ids_dim], dtype=np.float32),
            (VALIDATION_BATCH, 1),
        )
    if ctx.controlnet_residuals:
        from .controlnet import residual_inputs

        inputs.update(residual_inputs(ctx, rng))
    if ctx.ip_adapter_embeds_dim is not None:
        from .ip_adapter import embeds_inputs

        inputs.update(embeds_inputs(ctx, rng))
    return inputs


def _latents(ctx: ExportContext, rng, scale: float):
    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    return {"latent_sample": (rng.standard_normal((1, ctx.latent_channels, h, w)) * scale).astype(np.float32)}


def _vae_decoder_inputs(ctx: ExportContext, rng):
    # unit-variance latents unscaled, as the pipeline hands them over: an fp16 overflow shows at this magnitude
    return _latents(ctx, rng, 1.0 / ctx.vae_scaling_factor)


def _tiny_decoder_inputs(ctx: ExportContext, rng):
    return _latents(ctx, rng, 1.0)  # TAESD-style decoders take the scaled latents themselves


def _vae_encoder_inputs(ctx: ExportContext, rng):
    return {"sample": rng.uniform(-1, 1, (1, 3, ctx.height, ctx.width)).astype(np.float32)}


def _vae_encoder_call(pipe, x):
    encoded = pipe.vae.encode(x["sample"])
    if not hasattr(encoded, "latent_dist"):  # SANA's DC-AE: deterministic, the latent itself (export/sana.py)
        return [encoded.latent]
    return [encoded.latent_dist.parameters]  # mean and log-variance, as optimum exports them


def _text_call(pipe, x):
    # outputs in optimum's order; SDXL and SD3 bundles also carry every layer's hidden state (they read the
    # penultimate); SD3's first encoder is a CLIP with projection, whose pooled output is `text_embeds`
    if "prefix_keys" in x:  # SANA's Gemma-2 after its cached prefix (export/gemma_prefix.py)
        from .gemma_prefix import prefixed_call

        return [prefixed_call(pipe.text_encoder, x)]
    if "attention_mask" in x:  # PixArt's T5: its last hidden state, on the masked tokens
        return [pipe.text_encoder(input_ids=x["input_ids"], attention_mask=x["attention_mask"]).last_hidden_state]
    out = pipe.text_encoder(
        input_ids=x["input_ids"], output_hidden_states=pipe.text_encoder.config.output_hidden_states
    )
    if hasattr(out, "text_embeds"):
        return [out.text_embeds, out.last_hidden_state, *(out.hidden_states or ())]
    return [out.last_hidden_state, out.pooler_output, *(out.hidden_states or ())]


def _text_2_call(pipe, x):
    if not hasattr(pipe.text_encoder_2, "text_projection"):  # FLUX's second encoder is T5: its last hidden state
        return [pipe.text_encoder_2(input_ids=x["input_ids"]).last_hidden_state]
    out = pipe.text_encoder_2(input_ids=x["input_ids"], output_hidden_states=True)
    return [out.text_embeds, out.last_hidden_state, *out.hidden_states]


def _text_3_call(pipe, x):
    return [pipe.text_encoder_3(input_ids=x["input_ids"]).last_hidden_state]


def _transformer_call(pipe, x):
    from .controlnet import is_block_input, transformer_block_kwargs

    if "img_ids" in x or "encoder_attention_mask" in x:  # FLUX, SANA: the graph's inputs are the call's
        plain = {k: v for k, v in x.items() if not is_block_input(k)}  # FLUX's block samples go in as lists
        return [pipe.transformer(**plain, **transformer_block_kwargs(x)).sample]
    if TEXT_LOG_COUNTS in x:  # counted text: diffusers' transformer on the sequence it stands for
        from .counted_text import expanded

        x = {**x, "encoder_hidden_states": expanded(x["encoder_hidden_states"], x[TEXT_LOG_COUNTS])}
    return [
        pipe.transformer(
            hidden_states=x["hidden_states"],
            encoder_hidden_states=x["encoder_hidden_states"],
            pooled_projections=x["pooled_projections"],
            timestep=x["timestep"],
            **transformer_block_kwargs(x),  # a bundle with ControlNets: their block samples
        ).sample
    ]


def _unet_call(pipe, x):
    from .controlnet import unet_residual_kwargs
    from .ip_adapter import unet_ip_kwargs

    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "text_embeds" in x else None
    image = unet_ip_kwargs(pipe.unet, x)  # a bundle with an IP-Adapter: the image embeddings, at its scale
    if image:
        added = {**(added or {}), **image}
    return [
        pipe.unet(
            x["sample"],
            x["timestep"],
            x["encoder_hidden_states"],
            timestep_cond=x.get("timestep_cond"),
            added_cond_kwargs=added,
            **unet_residual_kwargs(x),  # a bundle with ControlNets: their residuals
        ).sample
    ]


def _vae_decoder_call(pipe, x):
    return [pipe.vae.decode(x["latent_sample"]).sample]


def _tiny_decoder_call(tiny, x):
    return [tiny.decode(x["latent_sample"]).sample]


# Exported when the source pipeline has the module (optimum lists it): text_encoder_2 for SDXL and SD3 (CLIP)
# and FLUX (T5), text_encoder_3 (T5) for SD3 only, transformer for SD3 and FLUX.
COMPONENTS: tuple[ComponentExport, ...] = (
    ComponentExport("text_encoder", _text_call, _text_inputs, module="text_encoder"),
    ComponentExport("text_encoder_2", _text_2_call, _text_2_inputs, module="text_encoder_2"),
    ComponentExport("text_encoder_3", _text_3_call, _text_3_inputs, module="text_encoder_3"),
    ComponentExport("unet", _unet_call, _unet_inputs, module="unet"),
    ComponentExport("transformer", _transformer_call, _transformer_inputs, module="transformer"),
    ComponentExport("vae_decoder", _vae_decoder_call, _vae_decoder_inputs, fp16_may_overflow=True, module="vae"),
    # image-to-image and inpainting start from an encoded image
    ComponentExport("vae_encoder", _vae_encoder_call, _vae_encoder_inputs, fp16_may_overflow=True, module="vae"),
)

# Optional: exported only when a tiny decoder is given (its torch_call takes the AutoencoderTiny itself).
TINY_DECODER = ComponentExport("vae_decoder_tiny", _tiny_decoder_call, _tiny_decoder_inputs, fp16_may_overflow=True)


# Text encoders whose activations pass fp16's 65504: T5 v1.1 (the feed-forward outputs of the large models, which
# is why transformers keeps T5's `wo` in fp32 under fp16) and Gemma-2 (trained in bf16, whose range it uses). The
# component that holds one (SD3's text_encoder_3, FLUX's text_encoder_2, PixArt-Sigma's and SANA's text_encoder) is
# tried in fp16 like the VAE, and kept fp32 when its fp16 graph fails the check.
FP16_OVERFLOW_ENCODERS = ("T5EncoderModel", "UMT5EncoderModel", "Gemma2Model")


def may_overflow_fp16(component: ComponentExport, pipeline) -> bool:
    """Whether `component`'s fp16 graph may fail its check by overflowing: kept fp32 then, not an error."""
    held = getattr(pipeline, component.module, None) if component.module else None
    return component.fp16_may_overflow or type(held).__name__ in FP16_OVERFLOW_ENCODERS


def check_side(cells: int) -> int:
    """The latent cells one side of a dynamic-size graph is checked at, for a bundle side of `cells`."""
    reduced = cells // CHECK_SIDE_FRACTION // CHECK_CELL_MULTIPLE * CHECK_CELL_MULTIPLE
    return min(cells, max(CHECK_CELL_MULTIPLE, reduced))


# optimum's name for FLUX's image-token axis: the latent grid packed 2x2, so the image's height and width
PACKED_AXIS = "packed_height_width"


def is_spatial(axes: dict) -> bool:
    """Whether an input's named (so dynamic) axes are an image's height and width (batch, channels, height,
    width), or FLUX's packed image tokens."""
    return {2, 3} <= set(axes) or PACKED_AXIS in axes.values()


def has_dynamic_spatial_axes(export_config) -> bool:
    """Whether optimum exports some input of this graph with dynamic image size (is_spatial)."""
    return any(is_spatial(axes) for axes in export_config.inputs.values())


def check_context(ctx: ExportContext, spatial: bool) -> ExportContext:
    """The context a graph's check runs in: the bundle's size, or a smaller grid for dynamic-size graphs."""
    if not spatial:
        return ctx
    scale = ctx.vae_scale_factor
    return dataclasses.replace(
        ctx, height=check_side(ctx.height // scale) * scale, width=check_side(ctx.width // scale) * scale
    )
