"""The manifest both targets write: the family's defaults, the resolved scheduler, the text conditioning
(with its tokenizer files) and the provenance."""

from __future__ import annotations

import datetime
import os
from importlib import metadata
from pathlib import Path

from edgediff.runtime.manifest import TOKENIZER_2_NAME, TOKENIZER_3_NAME, TOKENIZER_NAME, Manifest
from edgediff.runtime.schedulers import SAMPLER_TO_DIFFUSERS_CLASS, SAMPLERS, sampler_for_scheduler

from .options import ExportOptions
from .pixart import PIXART_MAX_SEQUENCE_LENGTH, is_pixart
from .sana import SANA_MAX_SEQUENCE_LENGTH, is_sana
from .source import FLUX_MAX_SEQUENCE_LENGTH, is_flux
from .specs import ExportContext
from .tokenizer import write_tokenizer_json

# the distributions whose versions decide what an export writes, recorded for reproducing it
RECORDED_VERSIONS = ("edgediff", "torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime")


def versions() -> dict:
    out = {}
    for dist in RECORDED_VERSIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def recorded_path(source: str | None, out: Path) -> str | None:
    """How provenance names a source: a hub id as given; a local folder or file relative to the bundle
    (an absolute path would name one machine's folders, and a bundle moved with its sources keeps the link)."""
    if source is None:
        return None
    local = Path(source).expanduser()
    if not local.exists():
        return source
    try:
        return Path(os.path.relpath(local.resolve(), Path(out).resolve())).as_posix()
    except ValueError:  # on another Windows drive than the bundle: no relative path exists
        return local.resolve().name


def resolve_scheduler(pipe, family) -> dict:
    """Our sampler and its fully resolved diffusers config (defaults filled in by diffusers itself)."""
    import diffusers

    # DPMSolverMultistepScheduler is SANA's flow form or PixArt's VP form: the config decides
    ours = sampler_for_scheduler(type(pipe.scheduler).__name__, dict(pipe.scheduler.config))
    sampler = family.sampler if family.guidance_embedding or ours is None else ours
    resolved = getattr(diffusers, SAMPLER_TO_DIFFUSERS_CLASS[sampler]).from_config(pipe.scheduler.config)
    config = {**dict(resolved.config), **dict(family.scheduler_overrides)}
    # diffusion samplers keep a ScheduleConfig, flow samplers a FlowScheduleConfig (SD3's shift among it)
    return {"name": sampler, "config": SAMPLERS[sampler].config_class.from_dict(config).to_dict()}


def write_text_conditioning(pipe, staging: Path, max_sequence_length: int | None = None) -> tuple[dict, dict]:
    """Writes each text encoder's tokenizer; returns the manifest's `tokenizer` entry and its `conditioning`:
    which encoders run, which output each gives the UNet, and SDXL's pooled text and micro-conditioning.
    `max_sequence_length`: SD3's T5 tokens (source.sd3_max_sequence_length; None: the pipeline's default)."""
    if is_sana(pipe):  # Gemma's tokenizer pads to the call's length (the instruction prefix's tokens added)
        tokenizer_entry = write_tokenizer_json(pipe.tokenizer, staging / TOKENIZER_NAME, SANA_MAX_SEQUENCE_LENGTH)
        return tokenizer_entry, _sana_conditioning(pipe, tokenizer_entry)
    if is_pixart(pipe):  # T5's tokenizer pads to the call's length
        tokenizer_entry = write_tokenizer_json(pipe.tokenizer, staging / TOKENIZER_NAME, PIXART_MAX_SEQUENCE_LENGTH)
        return tokenizer_entry, _pixart_conditioning(tokenizer_entry)
    tokenizer_entry = write_tokenizer_json(pipe.tokenizer, staging / TOKENIZER_NAME)
    if is_flux(pipe):
        return tokenizer_entry, _flux_conditioning(pipe, staging, tokenizer_entry)
    if getattr(pipe, "transformer", None) is not None:
        return tokenizer_entry, _sd3_conditioning(pipe, staging, tokenizer_entry, max_sequence_length)
    if getattr(pipe, "text_encoder_2", None) is None:
        return tokenizer_entry, {
            "encoders": [{"component": "text_encoder", "tokenizer": tokenizer_entry, "output": "last_hidden_state"}]
        }
    tokenizer_2_entry = write_tokenizer_json(pipe.tokenizer_2, staging / TOKENIZER_2_NAME)
    # as StableDiffusionXLPipeline (clip_skip None): each encoder's penultimate layer, concatenated, and the
    # second encoder's projected pooled output
    penultimate = [
        f"hidden_states.{int(enc.config.num_hidden_layers) - 1}" for enc in (pipe.text_encoder, pipe.text_encoder_2)
    ]
    return tokenizer_entry, {
        "encoders": [
            {"component": "text_encoder", "tokenizer": tokenizer_entry, "output": penultimate[0]},
            {
                "component": "text_encoder_2",
                "tokenizer": tokenizer_2_entry,
                "output": penultimate[1],
                "pooled": "text_embeds",
            },
        ],
        "zero_negative": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        "time_ids": "size-crop-target",
    }


def _sd3_conditioning(pipe, staging: Path, tokenizer_entry: dict, max_sequence_length: int | None = None) -> dict:
    """SD3's conditioning, as StableDiffusion3Pipeline.encode_prompt (clip_skip None): both CLIPs' penultimate
    hidden states side by side, zero-padded to the transformer's joint width, then T5's last hidden state (zeros
    when the bundle has no T5) along the sequence; both CLIPs' projected pooled outputs side by side."""
    from .source import SD3_MAX_SEQUENCE_LENGTH

    length = max_sequence_length or SD3_MAX_SEQUENCE_LENGTH
    encoders = [
        {
            "component": name,
            "tokenizer": entry,
            "output": f"hidden_states.{int(enc.config.num_hidden_layers) - 1}",
            "pooled": "text_embeds",
        }
        for name, enc, entry in (
            ("text_encoder", pipe.text_encoder, tokenizer_entry),
            ("text_encoder_2", pipe.text_encoder_2, write_tokenizer_json(pipe.tokenizer_2, staging / TOKENIZER_2_NAME)),
        )
    ]
    t5 = getattr(pipe, "text_encoder_3", None) is not None
    if t5:
        entry = write_tokenizer_json(pipe.tokenizer_3, staging / TOKENIZER_3_NAME, length)
        encoders.append({"component": "text_encoder_3", "tokenizer": entry, "output": "last_hidden_state"})
    return {
        "encoders": encoders,
        "joint": "sd3",  # how the runtime combines the encoders' outputs (runtime/denoisers/sd3.py)
        "t5": t5,
        "max_sequence_length": length,
        "joint_attention_dim": int(pipe.transformer.config.joint_attention_dim),
    }


def _flux_conditioning(pipe, staging: Path, tokenizer_entry: dict) -> dict:
    """FLUX's conditioning, as FluxPipeline.encode_prompt: CLIP-L's pooled output is the pooled text, T5's last
    hidden state (max_sequence_length tokens; FLUX's T5 is its text_encoder_2) the transformer's text tokens.
    Position ids: (0, row, col) per packed image token, zeros per text token. build_manifest sets the family's
    max_sequence_length."""
    t5_entry = write_tokenizer_json(pipe.tokenizer_2, staging / TOKENIZER_2_NAME, FLUX_MAX_SEQUENCE_LENGTH)
    return {
        "encoders": [
            {
                "component": "text_encoder",
                "tokenizer": tokenizer_entry,
                "output": "pooler_output",
                "pooled": "pooler_output",
            },
            {"component": "text_encoder_2", "tokenizer": t5_entry, "output": "last_hidden_state"},
        ],
        "joint": "flux",  # how the runtime combines the encoders' outputs (runtime/denoisers/flux.py)
        "max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH,
        # dev: the guidance scale is a transformer input (embedded), never an unconditional batch
        "guidance_embedding": bool(pipe.transformer.config.guidance_embeds),
        "ids": {"image": "zero-row-col", "text": "zeros"},
    }


def _sana_conditioning(pipe, tokenizer_entry: dict) -> dict:
    """SANA's conditioning, as SanaPipeline.encode_prompt (clean_caption False): prompts lower-cased and stripped,
    the pipeline's default complex-human-instruction prefix before each prompt (not before negative prompts),
    Gemma-2's last hidden state on the masked tokens, of which the first and the last max_sequence_length - 1 are
    kept, with their mask as the transformer's encoder_attention_mask. The timestep goes in times timestep_scale
    (SANA) or as SCM's flow time (Sprint, whose transformer embeds guidance x guidance_embeds_scale)."""
    import inspect

    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    config = pipe.transformer.config
    return {
        "encoders": [
            {"component": "text_encoder", "tokenizer": tokenizer_entry, "output": "last_hidden_state", "mask": True}
        ],
        "joint": "sana",  # how the runtime conditions the transformer (runtime/denoisers/sana.py)
        "max_sequence_length": SANA_MAX_SEQUENCE_LENGTH,
        "instruction": "\n".join(instruction or []),
        "timestep_scale": float(config.get("timestep_scale", 1.0)),
        "guidance_embedding": bool(config.get("guidance_embeds", False)),
        "guidance_embeds_scale": float(config.get("guidance_embeds_scale", 0.1)),
    }


def _pixart_conditioning(tokenizer_entry: dict) -> dict:
    """PixArt-Sigma's conditioning, as PixArtSigmaPipeline.encode_prompt (clean_caption False): prompts and negative
    prompts lower-cased and stripped, T5's last hidden state on max_sequence_length masked tokens, the mask going to
    the transformer as encoder_attention_mask; the timestep as the sampler's. SANA's conditioning without its
    instruction prefix (runtime/denoisers/pixart.py)."""
    return {
        "encoders": [
            {"component": "text_encoder", "tokenizer": tokenizer_entry, "output": "last_hidden_state", "mask": True}
        ],
        "joint": "pixart",
        "max_sequence_length": PIXART_MAX_SEQUENCE_LENGTH,
    }


def bundle_defaults(fam, ctx: ExportContext, options: ExportOptions) -> dict:
    """The manifest's `defaults`: the call a bundle makes when the caller says nothing."""
    return {
        "steps": options.default_steps or fam.default_steps,
        "guidance": fam.default_guidance if options.default_guidance is None else options.default_guidance,
        "height": ctx.height,
        "width": ctx.width,
    }


def guided(defaults: dict, guidance_embedding_dim: int | None) -> bool:
    """Whether a UNet bundle's default call runs classifier-free guidance (runtime/pipeline.py's rule): a scale past 1,
    not embedded (LCM)."""
    return defaults["guidance"] > 1.0 and guidance_embedding_dim is None


def build_manifest(
    pipe,
    fam,
    ctx: ExportContext,
    text: tuple[dict, dict],
    components: dict,
    options: ExportOptions,
    provenance: dict,
    controlnets: list[dict] | None = None,
    ip_adapter: dict | None = None,
) -> Manifest:
    """The manifest of a bundle whose components are written; `provenance` is the target's own record
    (source, checks), to which the date and tool versions are added; `controlnets` lists the bundle's ControlNet
    graphs (export/controlnet.py manifest_entries); `ip_adapter` the IP-Adapter's (export/ip_adapter.py)."""
    tokenizer_entry, conditioning = text
    scheduler = resolve_scheduler(pipe, fam)
    if conditioning.get("joint") == "flux":  # the family's T5 length (schnell 256, dev 512)
        conditioning = {**conditioning, "max_sequence_length": ctx.max_sequence_length}
    return Manifest(
        family=fam.name,
        # as the resolved scheduler says it: flow schedulers' configs carry none, so theirs is "flow_prediction"
        prediction_type=scheduler["config"]["prediction_type"],
        scheduler=scheduler,
        defaults=bundle_defaults(fam, ctx, options),
        latent_channels=ctx.latent_channels,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_shift_factor=float(pipe.vae.config.get("shift_factor") or 0.0),
        vae_scale_factor=ctx.vae_scale_factor,
        latent_packing=ctx.packing,
        tokenizer=tokenizer_entry,
        conditioning=conditioning,
        guidance_embedding_dim=ctx.time_cond_proj_dim,
        components=components,
        target=options.target,
        controlnets=list(controlnets or []),
        ip_adapter=ip_adapter,
        provenance={
            **provenance,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        },
    )
