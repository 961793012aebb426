"""Loading the source: a local diffusers folder or a hub id, and the facts the registry detects from."""

from __future__ import annotations

from pathlib import Path

from edgediff.models.registry import SourceFacts
from edgediff.runtime.errors import ExportError


def load_pipeline(source: str):
    """A diffusers StableDiffusionPipeline in fp32 on the CPU; hub ids need the network (or the HF cache)."""
    import torch
    from diffusers import StableDiffusionPipeline

    local = Path(source)
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise ExportError("export_source", source=source, detail="no such folder, and not a hub id (owner/name)")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else source, torch_dtype=torch.float32,
            safety_checker=None, requires_safety_checker=False,
        )
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
        name=source,
    )
