"""The model families edgediff knows, one row each, with the settings a bundle of that family defaults to.

Detection reads facts from the source model's configs (never version strings); rows are tried in order,
most specific first, and `--family` overrides detection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class SourceFacts:
    """What detection may look at, read from a diffusers folder's configs."""

    scheduler_class: str  # e.g. "EulerDiscreteScheduler"
    prediction_type: str  # epsilon | v_prediction | sample
    timestep_spacing: str | None  # as written in the scheduler config (None when absent)
    cross_attention_dim: int  # 768 for SD 1.x (CLIP-L), 1024 for SD 2.x (OpenCLIP-H)
    time_cond_proj_dim: int | None  # set for LCM-distilled UNets: guidance arrives as an embedding
    name: str = ""  # hub id or folder name, only as a hint for Turbo / Lightning / SDXS models
    text_encoders: int = 1  # 2 for SDXL (CLIP-L + OpenCLIP-bigG, pooled text and micro-conditioning)
    mid_block: bool = True  # BK-SDM and small-sd prune the UNet's mid-block away
    # the denoiser's class when it is a transformer (SD3Transformer2DModel); None for UNets
    transformer_class: str | None = None
    qk_norm: str | None = None  # the transformer's query-key normalisation: SD3.5 has "rms_norm", SD3 none
    guidance_embeds: bool = False  # FLUX.1-dev: the guidance scale enters the transformer as an embedding


def _named(f: SourceFacts, *hints: str) -> bool:
    return any(h in f.name.lower() for h in hints)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    sampler: str  # our sampler used by default (runtime/schedulers)
    default_steps: int  # the few-step count the family is distilled for, or a good quality/speed point
    default_guidance: float  # classifier-free guidance scale (or LCM's embedded w); <= 1 disables CFG
    guidance_embedding: bool  # True: guidance goes in as timestep_cond (LCM), no uncond batch
    matches: Callable[[SourceFacts], bool]
    # Fields that must hold in the scheduler config the bundle records (e.g. Turbo's trailing spacing).
    scheduler_overrides: tuple[tuple[str, object], ...] = ()
    # Default image side in pixels when the family is trained at another size than its UNet's sample_size
    # says (SDXL-Turbo: the SDXL UNet, distilled at 512); None: sample_size x the VAE's scale.
    default_size: int | None = None
    # the T5 tokens prompts take by default (FLUX: schnell 256, dev 512); None: the pipeline's own constant
    max_sequence_length: int | None = None
    # The VAE decoder takes static int8 in int8-static bundles (quantize.component_policy). SANA's DC-AE decoder is
    # most of an image's time on CPUs (71% at 512, 1 step); the KL VAEs' decoders stay fp32 (quantize.py says why)
    static_int8_decoder: bool = False


def _sd3(f: SourceFacts) -> bool:
    return f.transformer_class == "SD3Transformer2DModel"


def _flux(f: SourceFacts) -> bool:
    return f.transformer_class == "FluxTransformer2DModel"


def _sana(f: SourceFacts) -> bool:
    return f.transformer_class == "SanaTransformer2DModel"


def _pixart(f: SourceFacts) -> bool:
    return f.transformer_class == "PixArtTransformer2DModel"


FAMILIES: tuple[Family, ...] = (
    # PixArt-Sigma: a DiT with cross-attention to T5 (masked, 300 tokens) over the SD VAE's latents, patch 2 (sizes
    # multiples of 16); epsilon with a learned variance, sampled with the VP DPM-Solver++ its scheduler config names.
    # Its native size is the transformer's sample_size x 8 (1024 for PixArt-Sigma-XL-2-1024-MS).
    Family(
        name="pixart-sigma",
        description="PixArt-Sigma (DiT, T5 text with its mask, SDXL VAE), DPM-Solver++, 20 steps, guidance 4.5",
        sampler="dpmpp",
        default_steps=20,
        default_guidance=4.5,
        guidance_embedding=False,
        matches=_pixart,
        max_sequence_length=300,
    ),
    # SANA rows: its linear-attention DiT sets them apart (600M / 1.6B, 512 / 1024 px: the size is the transformer's
    # sample_size x DC-AE's 32). Sprint's transformer embeds the guidance (SanaSprintPipeline: no unconditional
    # batch) and its scheduler is SCM's, 1-4 steps; SANA's is the flow DPM-Solver++ its scheduler config names.
    Family(
        name="sana-sprint",
        description="SANA-Sprint (sCM-distilled SANA, Gemma-2 text, DC-AE), 1-4 steps, embedded guidance 4.5",
        sampler="scm",
        default_steps=2,
        default_guidance=4.5,
        guidance_embedding=True,
        matches=lambda f: _sana(f) and (f.guidance_embeds or f.scheduler_class == "SCMScheduler"),
        max_sequence_length=300,
        static_int8_decoder=True,
    ),
    Family(
        name="sana",
        description="SANA 600M / 1.6B (linear-attention DiT, Gemma-2 text, DC-AE f32), flow DPM-Solver++, 20 steps",
        sampler="flow_dpmpp",
        default_steps=20,
        default_guidance=4.5,
        guidance_embedding=False,
        matches=_sana,
        max_sequence_length=300,
        static_int8_decoder=True,
    ),
    # FLUX.1 rows: its transformer class sets them apart; dev's transformer embeds the guidance (guidance-distilled,
    # no unconditional batch), schnell's has no guidance at all (timestep-distilled, 1-4 steps). Flow matching: the
    # Euler flow sampler on FluxPipeline's sigmas, shifted as the model's scheduler config says (dev: by the
    # image's token count).
    Family(
        name="flux-dev",
        description="FLUX.1-dev (guidance-distilled MMDiT, CLIP-L pooled + T5), 28 steps, guidance 3.5, 1024x1024",
        sampler="flow_euler",
        default_steps=28,
        default_guidance=3.5,
        guidance_embedding=True,
        matches=lambda f: _flux(f) and f.guidance_embeds,
        default_size=1024,
        max_sequence_length=512,
    ),
    Family(
        name="flux-schnell",
        description="FLUX.1-schnell (timestep-distilled MMDiT, CLIP-L pooled + T5), 1-4 steps, no guidance, 1024x1024",
        sampler="flow_euler",
        default_steps=4,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=_flux,
        default_size=1024,
        max_sequence_length=256,
    ),
    # SD3 rows first: their MMDiT denoiser sets them apart (with T5 left out they have two text encoders, as SDXL).
    # Flow matching: the Euler flow sampler with the model's own shift (its scheduler config, recorded as it is).
    Family(
        name="sd3.5-turbo",
        description="SD3.5-large-turbo (adversarial diffusion distillation), 4 steps, no guidance",
        sampler="flow_euler",
        default_steps=4,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=lambda f: _sd3(f) and _named(f, "turbo"),
    ),
    Family(
        name="sd3.5",
        description="SD3.5 medium / large (MMDiT with QK-normalisation), flow matching, 28 steps, 1024x1024",
        sampler="flow_euler",
        default_steps=28,
        default_guidance=4.5,
        guidance_embedding=False,
        matches=lambda f: _sd3(f) and f.qk_norm is not None,
    ),
    Family(
        name="sd3",
        description="SD3-medium (MMDiT, CLIP-L + CLIP-G + optional T5), flow matching, 28 steps, 1024x1024",
        sampler="flow_euler",
        default_steps=28,
        default_guidance=7.0,
        guidance_embedding=False,
        matches=_sd3,
    ),
    # SDXL rows next: two text encoders is the fact that sets them apart.
    Family(
        name="sdxl-lcm",
        description="LCM-distilled SDXL UNet (latent-consistency/lcm-sdxl), guidance as an embedding, 2-8 steps",
        sampler="lcm",
        default_steps=4,
        default_guidance=8.0,
        guidance_embedding=True,
        matches=lambda f: f.text_encoders == 2 and f.time_cond_proj_dim is not None,
    ),
    Family(
        name="sdxl-turbo",
        description="SDXL-Turbo (adversarially distilled SDXL), 1-4 steps at 512x512, no guidance",
        sampler="euler_ancestral",
        default_steps=1,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=lambda f: (
            f.text_encoders == 2
            and (
                _named(f, "turbo")
                or (f.scheduler_class == "EulerAncestralDiscreteScheduler" and f.timestep_spacing == "trailing")
            )
        ),
        scheduler_overrides=(("timestep_spacing", "trailing"),),
        default_size=512,
    ),
    Family(
        name="sdxl-lightning",
        description="SDXL-Lightning (progressive adversarial distillation), 2-8 steps, Euler trailing, no guidance",
        sampler="euler",
        default_steps=4,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=lambda f: f.text_encoders == 2 and _named(f, "lightning"),
        scheduler_overrides=(("timestep_spacing", "trailing"),),
    ),
    Family(
        name="sdxl",
        description="SDXL base 1.0, epsilon prediction, 1024x1024 (also SDXL with an LCM / Hyper-SD LoRA fused)",
        sampler="euler",
        default_steps=25,
        default_guidance=5.0,
        guidance_embedding=False,
        matches=lambda f: f.text_encoders == 2,
    ),
    Family(
        name="sdxs",
        description="SDXS-512-style one-step student (small UNet, tiny decoder), 1 step, no guidance",
        sampler="euler",
        default_steps=1,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=lambda f: _named(f, "sdxs"),
        scheduler_overrides=(("timestep_spacing", "trailing"),),
    ),
    Family(
        name="lcm-sd1",
        description="LCM-distilled SD 1.x UNet (guidance as an embedding), 2-8 steps",
        sampler="lcm",
        default_steps=4,
        default_guidance=8.0,
        guidance_embedding=True,
        matches=lambda f: f.time_cond_proj_dim is not None,
    ),
    Family(
        name="sd-turbo",
        description="SD-Turbo (adversarially distilled SD 2.1 base), 1-4 steps, no guidance",
        sampler="euler",
        default_steps=1,
        default_guidance=0.0,
        guidance_embedding=False,
        matches=lambda f: (
            _named(f, "turbo") or (f.scheduler_class == "EulerDiscreteScheduler" and f.timestep_spacing == "trailing")
        ),
        scheduler_overrides=(("timestep_spacing", "trailing"),),
    ),
    Family(
        name="sd2-v",
        description="SD 2.x v-prediction (768 model)",
        sampler="euler",
        default_steps=25,
        default_guidance=7.5,
        guidance_embedding=False,
        matches=lambda f: f.prediction_type == "v_prediction",
    ),
    Family(
        name="sd2",
        description="SD 2.x base, epsilon prediction (512)",
        sampler="euler",
        default_steps=25,
        default_guidance=7.5,
        guidance_embedding=False,
        matches=lambda f: f.cross_attention_dim == 1024,
    ),
    Family(
        name="bk-sdm",
        description="BK-SDM / small-sd: SD 1.x with a pruned UNet (no mid-block, fewer blocks)",
        sampler="euler",
        default_steps=25,
        default_guidance=7.5,
        guidance_embedding=False,
        matches=lambda f: not f.mid_block or _named(f, "bk-sdm", "small-sd", "segmind/tiny-sd"),
    ),
    Family(
        name="sd1",
        description="SD 1.x, epsilon prediction",
        sampler="euler",
        default_steps=25,
        default_guidance=7.5,
        guidance_embedding=False,
        matches=lambda f: True,
    ),
)


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect_family(facts: SourceFacts) -> Family:
    return next(f for f in FAMILIES if f.matches(facts))
