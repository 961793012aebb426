"""Loading the source: a local diffusers folder or a hub id, the facts its family is detected from
(families.py), and the sizes it is exported at."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from edgediff.runtime.denoisers import SIZE_MULTIPLE
from edgediff.runtime.errors import ExportError, ExportOptionsError

from .families import SourceFacts, detect_family, get_family
from .gemma_prefix import prefix_shape
from .pixart import PIXART_MAX_SEQUENCE_LENGTH, PIXART_TRANSFORMER, is_pixart
from .sana import SANA_MAX_SEQUENCE_LENGTH, SANA_TRANSFORMER, dc_ae_scale_factor, is_sana
from .specs import ExportContext

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# SD3 prompts: T5 takes this many tokens unless the caller says otherwise (StableDiffusion3Pipeline's default)
SD3_MAX_SEQUENCE_LENGTH = 256
# FLUX prompts: FluxPipeline's own default, for families whose row names none (schnell's is 256: trained so)
FLUX_MAX_SEQUENCE_LENGTH = 512
FLUX_PACKING = 2  # FluxPipeline._pack_latents: each transformer token is a 2x2 patch of latent cells


def sd3_max_sequence_length(pipe, folder: Path | None) -> int:
    """T5's tokens in an SD3 bundle: StableDiffusion3Pipeline's default, or fewer where the T5 tokenizer declares
    fewer (`model_max_length`: a model trained on short prompts, whose T5 stand-in zeros must have its length
    too, so the folder's tokenizer config is read when T5 is left out)."""
    declared = getattr(getattr(pipe, "tokenizer_3", None), "model_max_length", None)
    config = folder / "tokenizer_3" / "tokenizer_config.json" if folder is not None else None
    if declared is None and config is not None and config.is_file():
        declared = json.loads(config.read_text(encoding="utf-8")).get("model_max_length")
    return min(SD3_MAX_SEQUENCE_LENGTH, int(declared)) if declared else SD3_MAX_SEQUENCE_LENGTH


def has_second_text_encoder(model_index: dict) -> bool:
    """SDXL-style folders list a second text encoder (CLIP-L + OpenCLIP-bigG); read from model_index.json,
    a fact of the folder, not its class name."""
    entry = model_index.get("text_encoder_2")
    return isinstance(entry, (list, tuple)) and entry[-1] is not None


def transformer_class(model_index: dict) -> str | None:
    """The denoiser's class when the folder's denoiser is a transformer (SD3Transformer2DModel,
    FluxTransformer2DModel), else None."""
    entry = model_index.get("transformer")
    return entry[-1] if isinstance(entry, (list, tuple)) and entry[-1] is not None else None


def stored_dtypes(folder: Path) -> dict:
    """diffusers' per-component torch_dtype for a local folder: components whose weights are all stored in fp16
    or bf16 stay so (memory_plan.stored_dtype), the rest load in fp32."""
    import torch

    from .memory_plan import LOADED, stored_dtype

    half = {"F16": torch.float16, "BF16": torch.bfloat16}
    dtypes = {name: half[d] for name in LOADED if (d := stored_dtype(folder / name)) is not None}
    return {"default": torch.float32, **dtypes}


def as_fp32(module) -> None:
    """Widens a module loaded in its stored half precision to fp32, in place, just before its export (parameter by
    parameter, so the half and fp32 copies of the whole module are never held together)."""
    import torch

    if isinstance(module, torch.nn.Module) and any(p.dtype != torch.float32 for p in module.parameters()):
        module.float()


def load_pipeline(source: str, t5: bool = True, stored_dtype: bool = False):
    """A diffusers StableDiffusionPipeline (StableDiffusionXLPipeline for folders with a second text encoder,
    StableDiffusion3Pipeline / FluxPipeline for folders whose denoiser is an SD3 / FLUX transformer) on the CPU, in
    fp32, or with `stored_dtype` (local folders) each component in the half precision its weights are stored in
    (as_fp32 widens it for its export: a bf16 model's loading peak is half the fp32 one); hub ids need the network
    (or the HF cache). `t5=False` leaves SD3's T5 encoder unloaded (it is most of SD3's weights); FLUX cannot do
    without its T5."""
    import torch
    from diffusers import (
        DiffusionPipeline,
        FluxPipeline,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ExportError("export_source", source=source, detail="no such folder, and not a hub id (owner/name)")
    where = str(local) if local.exists() else source
    dtype = stored_dtypes(local) if stored_dtype and local.is_dir() else torch.float32
    try:
        model_index = DiffusionPipeline.load_config(where)
        if transformer_class(model_index) == PIXART_TRANSFORMER:
            if not t5:  # T5 is PixArt's one text encoder
                raise ExportOptionsError("export_family_option", option="--no-t5", family="PixArt")
            pipe = DiffusionPipeline.from_pretrained(where, torch_dtype=dtype)  # PixArtSigmaPipeline
        elif transformer_class(model_index) == SANA_TRANSFORMER:
            if not t5:  # Gemma-2 is SANA's one text encoder
                raise ExportOptionsError("export_family_option", option="--no-t5", family="SANA")
            # SanaPipeline or SanaSprintPipeline, as the folder's model_index names it
            pipe = DiffusionPipeline.from_pretrained(where, torch_dtype=dtype)
        elif transformer_class(model_index) == "FluxTransformer2DModel":
            if not t5:  # T5 gives FLUX all of its text tokens: there is nothing to stand in for it
                raise ExportOptionsError("export_family_option", option="--no-t5", family="FLUX")
            pipe = FluxPipeline.from_pretrained(where, torch_dtype=dtype)
        elif transformer_class(model_index) == "SD3Transformer2DModel":
            without_t5 = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
            pipe = StableDiffusion3Pipeline.from_pretrained(where, torch_dtype=dtype, **without_t5)
        elif has_second_text_encoder(model_index):
            # no invisible watermark: it would change the pixels the export check compares
            pipe = StableDiffusionXLPipeline.from_pretrained(where, torch_dtype=dtype, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(
                where, torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
    except ExportOptionsError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExportError("export_source", source=source, detail=str(exc).splitlines()[0]) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_flux(pipe) -> bool:
    return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"


def denoiser(pipe):
    """The pipeline's denoiser: its UNet, or its transformer (SD3)."""
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def latent_multiple(pipe) -> int:
    """Latent cells each image side must hold a whole number of: a transformer's patch (SD3), or FluxPipeline's
    packing; a UNet's 2**upsamplers, since its graph is traced with fixed 2x upsamplings (diffusers forwards the
    skip connection's size instead only off that grid) which then meet their skip connections exactly."""
    if getattr(pipe, "unet", None) is not None:
        return 2 ** int(pipe.unet.num_upsamplers)
    return int(pipe.transformer.config.get("patch_size", 1)) * (FLUX_PACKING if is_flux(pipe) else 1)


def source_facts(pipe, source: str) -> SourceFacts:
    if getattr(pipe, "transformer", None) is not None:
        config = pipe.transformer.config
        return SourceFacts(
            scheduler_class=type(pipe.scheduler).__name__,
            prediction_type=pipe.scheduler.config.get("prediction_type", "flow_prediction"),
            timestep_spacing=pipe.scheduler.config.get("timestep_spacing"),
            # the text tokens' width: SD3 / FLUX's joint attention, SANA's / PixArt's caption channels (Gemma-2's / T5's)
            cross_attention_dim=int(config.get("joint_attention_dim") or config.get("caption_channels")),
            time_cond_proj_dim=None,
            text_encoders=sum(getattr(pipe, n, None) is not None for n in TEXT_ENCODERS),
            name=source,
            transformer_class=type(pipe.transformer).__name__,
            qk_norm=config.get("qk_norm"),
            guidance_embeds=bool(config.get("guidance_embeds", False)),
        )
    return SourceFacts(
        scheduler_class=type(pipe.scheduler).__name__,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        timestep_spacing=pipe.scheduler.config.get("timestep_spacing"),
        cross_attention_dim=int(pipe.unet.config.cross_attention_dim),
        time_cond_proj_dim=pipe.unet.config.time_cond_proj_dim,
        text_encoders=2 if getattr(pipe, "text_encoder_2", None) is not None else 1,
        mid_block=pipe.unet.mid_block is not None,
        name=source,
    )


def load_part(cls, source: str, what: str):
    """A diffusers model class's `from_pretrained` on a local folder or a hub id (owner/name), in fp32; anything
    else, or what diffusers cannot load, is an export error naming `what` it was meant to be."""
    import torch

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ExportError(
            "export_source", source=source, detail=f"{what}: no such folder, and not a hub id (owner/name)"
        )
    try:
        return cls.from_pretrained(str(local) if local.exists() else source, torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExportError("export_source", source=source, detail=f"{what}: {str(exc).splitlines()[0]}") from exc


def load_vae(source: str, latent_channels: int):
    """An AutoencoderKL to replace the model's own (e.g. madebyollin/sdxl-vae-fp16-fix, which stays finite
    in fp16 where SDXL's VAE overflows); a folder or hub id holding the VAE itself."""
    from diffusers import AutoencoderKL

    vae = load_part(AutoencoderKL, source, "VAE")
    if int(vae.config.latent_channels) != latent_channels:
        raise ExportError(
            "export_source",
            source=source,
            detail=f"VAE has {vae.config.latent_channels} latent channels, the model {latent_channels}",
        )
    return vae


def prepare_source(
    source: str,
    height: int | None,
    width: int | None,
    family: str | None,
    vae: str | None = None,
    t5: bool = True,
    stored_dtype: bool = False,
):
    """The diffusers pipeline (with `vae` replacing its VAE when given; SD3 without T5 when `t5` is False; with
    `stored_dtype`, components in their stored half precision: load_pipeline), its family row and the export
    context (sizes checked)."""
    pipe = load_pipeline(source, t5=t5, stored_dtype=stored_dtype)
    if vae:
        pipe.register_modules(vae=load_vae(vae, int(pipe.vae.config.latent_channels)))
    fam = get_family(family) if family else detect_family(source_facts(pipe, source))
    net = denoiser(pipe)
    flux, sana = is_flux(pipe), is_sana(pipe)
    vae_scale = dc_ae_scale_factor(pipe.vae) if sana else 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    patch = latent_multiple(pipe)
    native = fam.default_size or int(net.config.sample_size) * vae_scale
    default_h, default_w = height or native, width or native
    multiple = math.lcm(SIZE_MULTIPLE, vae_scale * patch)  # the runtime's rule (size_multiple)
    for what, value in (("height", default_h), ("width", default_w)):
        if value % multiple:
            raise ExportError("export_source", source=source, detail=f"{what} {value} is not a multiple of {multiple}")
    ctx = ExportContext(
        height=default_h,
        width=default_w,
        latent_channels=int(pipe.vae.config.latent_channels),
        unet_in_channels=int(net.config.in_channels),
        vae_scale_factor=vae_scale,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        max_length=int(pipe.tokenizer.model_max_length),
        vocab_size=int(pipe.text_encoder.config.vocab_size),
        cross_attention_dim=int(net.config.get("cross_attention_dim") or net.config.get("joint_attention_dim")),
        time_cond_proj_dim=net.config.get("time_cond_proj_dim"),
    )
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if sana or is_pixart(pipe):
        # Gemma-2's (SANA) or T5's (PixArt) hidden states, caption_channels wide, and their mask, checked at the
        # pipeline's token count
        length = SANA_MAX_SEQUENCE_LENGTH if sana else PIXART_MAX_SEQUENCE_LENGTH
        ctx = dataclasses.replace(
            ctx,
            max_length=length,
            max_sequence_length=length,
            cross_attention_dim=int(net.config.caption_channels),
            attention_mask=True,
            guidance_embeds=bool(net.config.get("guidance_embeds", False)),
            text_prefix=prefix_shape(pipe.text_encoder) if sana else None,
        )
    elif flux:  # CLIP-L's pooled output and T5's tokens (FLUX's text_encoder_2); packed latents, ids, guidance
        ctx = dataclasses.replace(
            ctx,
            vocab_size_2=int(text_encoder_2.config.vocab_size),
            pooled_dim=int(net.config.pooled_projection_dim),
            max_sequence_length=fam.max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH,
            text_2_length=fam.max_sequence_length or FLUX_MAX_SEQUENCE_LENGTH,
            packing=FLUX_PACKING,
            guidance_embeds=bool(net.config.guidance_embeds),
        )
    elif getattr(pipe, "transformer", None) is not None:  # SD3: pooled text of both CLIPs, T5 tokens after CLIP's
        text_encoder_3 = getattr(pipe, "text_encoder_3", None)
        ctx = dataclasses.replace(
            ctx,
            vocab_size_2=int(text_encoder_2.config.vocab_size),
            pooled_dim=int(net.config.pooled_projection_dim),
            vocab_size_3=None if text_encoder_3 is None else int(text_encoder_3.config.vocab_size),
            max_sequence_length=sd3_max_sequence_length(pipe, Path(source) if Path(source).is_dir() else None),
        )
    elif text_encoder_2 is not None:  # SDXL
        ctx = dataclasses.replace(
            ctx,
            vocab_size_2=int(text_encoder_2.config.vocab_size),
            pooled_dim=int(text_encoder_2.config.projection_dim),
            time_ids_dim=5 if getattr(pipe.config, "requires_aesthetics_score", False) else 6,
        )
    return pipe, fam, ctx
