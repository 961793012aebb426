"""Loading the source: a local diffusers folder or a hub id, and the facts the registry detects from."""

from __future__ import annotations

from pathlib import Path

from edgediff.models.registry import SourceFacts
from edgediff.runtime.errors import ExportError


def has_second_text_encoder(model_index: dict) -> bool:
    """SDXL-style folders list a second text encoder (CLIP-L + OpenCLIP-bigG); read from model_index.json,
    a fact of the folder, not its class name."""
    entry = model_index.get("text_encoder_2")
    return isinstance(entry, (list, tuple)) and entry[-1] is not None


def load_pipeline(source: str):
    """A diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline for folders with a second text
    encoder) in fp32 on the CPU; hub ids need the network (or the HF cache)."""
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ExportError("export_source", source=source, detail="no such folder, and not a hub id (owner/name)")
    where = str(local) if local.exists() else source
    try:
        if has_second_text_encoder(DiffusionPipeline.load_config(where)):
            # no invisible watermark: it would change the pixels the export check compares
            pipe = StableDiffusionXLPipeline.from_pretrained(where, torch_dtype=torch.float32, add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(where, torch_dtype=torch.float32,
                                                           safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExportError("export_source", source=source, detail=str(exc).splitlines()[0]) from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def source_facts(pipe, source: str) -> SourceFacts:
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


def load_vae(source: str, latent_channels: int):
    """An AutoencoderKL to replace the model's own (e.g. madebyollin/sdxl-vae-fp16-fix, which stays finite
    in fp16 where SDXL's VAE overflows); a folder or hub id holding the VAE itself."""
    import torch
    from diffusers import AutoencoderKL

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ExportError("export_source", source=source, detail="VAE: no such folder, and not a hub id (owner/name)")
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else source, torch_dtype=torch.float32)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExportError("export_source", source=source, detail=f"VAE: {str(exc).splitlines()[0]}") from exc
    if int(vae.config.latent_channels) != latent_channels:
        raise ExportError("export_source", source=source,
                          detail=f"VAE has {vae.config.latent_channels} latent channels, the model {latent_channels}")
    return vae
