"""Diffusers Stable Diffusion folders with random weights, built from configs (no downloads).

Tiny ones drive the fast tests (as diffusers' own tiny-random-model tests do); the full-size
SD-Turbo architecture drives the slow test and the benchmarks (timings don't depend on weight values).

    python -m edgediff.models.random_init tiny-sd1 OUT_DIR
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .tokenizer_build import build_clip_tokenizer, build_gemma_tokenizer, build_t5_tokenizer

# Scheduler settings of the published models these architectures stand for.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
SD21_V_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    **{k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"},
    "prediction_type": "v_prediction",
}
SD_TURBO_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **{k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"},
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "trailing",
    "use_karras_sigmas": False,
}
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "original_inference_steps": 50,
    "prediction_type": "epsilon",
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_scaling": 10.0,
    "timestep_spacing": "leading",
}

TINY_UNET = dict(  # diffusers' tiny test UNet, a little wider so images carry signal
    block_out_channels=(8, 16),
    layers_per_block=1,
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    norm_num_groups=4,
    attention_head_dim=2,
)
TINY_VAE = dict(
    block_out_channels=(8, 16),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    vocab_size=1000,
    max_position_embeddings=77,
    projection_dim=32,
)
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    **{k: v for k, v in SD15_SCHEDULER.items() if k != "_class_name"},
    "interpolation_type": "linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}
SDXL_TURBO_SCHEDULER = {
    **SDXL_SCHEDULER,
    "_class_name": "EulerAncestralDiscreteScheduler",
    "timestep_spacing": "trailing",
}
# SDXL: the second text encoder (OpenCLIP-bigG stand-in) differs in width from the first, so that a mix-up of
# the two, or of hidden and pooled outputs, changes shapes; the UNet's cross-attention takes both (32 + 48).
TINY_TEXT_2 = dict(
    TINY_TEXT, hidden_size=48, num_attention_heads=4, num_hidden_layers=3, projection_dim=24, hidden_act="gelu"
)
TINY_SDXL_UNET = dict(
    TINY_UNET,
    cross_attention_dim=32 + 48,
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2),
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 24,  # 6 micro-conditions (size, crop, target) + pooled text
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)

# SD3 / SD3.5: a flow-matching MMDiT over 16-channel latents, two CLIP encoders with projection (pooled text) and
# T5. Widths differ so that mix-ups change shapes: CLIP 32 + 48 side by side, padded to T5's 96 (the joint width);
# pooled 32 + 24. qk_norm and a dual-attention layer are SD3.5's; patch 2 x VAE 8 makes sizes multiples of 16.
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
TINY_SD3_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=96,
    caption_projection_dim=32,
    pooled_projection_dim=32 + 24,
    pos_embed_max_size=16,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),
)
TINY_SD3_VAE = dict(
    TINY_VAE,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    sample_size=64,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TINY_T5 = dict(
    d_model=96, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0
)

# FLUX.1: a flow-matching MMDiT (double- and single-stream blocks) over 16-channel latents packed 2x2 into 64-wide
# tokens (patch_size 1: the pipeline packs), CLIP-L's pooled output (32) and T5's hidden states (96) as the text;
# rotary position ids over (0, row, col), axes 4 + 4 + 8 = the head width. dev embeds the guidance scale.
# Schedulers as published: schnell a static shift of 1, dev shifted by the image's token count.
FLUX_SCHNELL_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
FLUX_DEV_SCHEDULER = {**FLUX_SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
TINY_FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=16 * 4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=96,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(4, 4, 8),
)
TINY_FLUX_VAE = dict(TINY_SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE factors

# SANA: a linear-attention DiT over DC-AE latents (32x compression: six stages, five 2x downsamplings), Gemma-2's
# last hidden state (caption_channels wide) as the text. Tiny widths with the real structure: ResBlock stages then
# EfficientViT stages, pixel (un)shuffle resampling, RMS-norm decoder. Schedulers as published: SANA's flow
# DPM-Solver++ (flow_shift 3), SANA-Sprint's SCM (whose transformer embeds the guidance and normalises q and k).
SANA_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
    "use_flow_sigmas": True,
}
SANA_SPRINT_SCHEDULER = {
    "_class_name": "SCMScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "trigflow",
    "sigma_data": 0.5,
}
TINY_SANA_TRANSFORMER = dict(
    patch_size=1,
    in_channels=8,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=24,
    sample_size=4,  # latent cells: 128 px over the 32x DC-AE
)
TINY_SANA_SPRINT_TRANSFORMER = dict(TINY_SANA_TRANSFORMER, qk_norm="rms_norm_across_heads", guidance_embeds=True)
TINY_DC_AE = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=4,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(8, 8, 8, 8, 16, 16),
    decoder_block_out_channels=(8, 8, 8, 8, 16, 16),
    encoder_layers_per_block=(1,) * 6,
    decoder_layers_per_block=(1,) * 6,
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    scaling_factor=0.41407,  # DC-AE f32c32's
)
TINY_GEMMA2 = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=12,
    max_position_embeddings=4096,
    sliding_window=64,
)

# PixArt-Sigma: a DiT with cross-attention to T5's masked hidden states (caption_channels wide) over the SD VAE's
# 4 latent channels, patch 2; it predicts epsilon and a learned variance (out_channels 8, the pipeline keeps the
# first 4). Scheduler as published: a VP-schedule DPM-Solver++ (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS); its VAE
# is SDXL's (scaling factor 0.13025).
PIXART_SIGMA_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "euler_at_final": False,
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "timestep_spacing": "linspace",
}
TINY_PIXART_TRANSFORMER = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=16,  # the inner width: heads x head_dim
    caption_channels=TINY_T5["d_model"],
    sample_size=8,  # latent cells: 64 px over the 8x VAE
    patch_size=2,
    norm_type="ada_norm_single",
    use_additional_conditions=False,  # Sigma's: no resolution / aspect-ratio embedding
)
# 8x like the real one (four stages), so that sides are multiples of 16 as PixArt's (patch 2 x VAE 8)
TINY_PIXART_VAE = dict(
    TINY_VAE,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=64,
    scaling_factor=0.13025,
)

# Full-size text encoders as published: CLIP ViT-L/14's (SD 1.x, SDXL's first, SD3's and FLUX.1's CLIP), OpenCLIP
# ViT-bigG/14's (SDXL's second, SD3's CLIP-G), and T5 v1.1 XXL's encoder (SD3's and FLUX.1's T5: 4.76 B parameters).
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    hidden_act="quick_gelu",
    projection_dim=768,
    vocab_size=49408,
    max_position_embeddings=77,
)
CLIP_G = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    hidden_act="gelu",
    projection_dim=1280,
    vocab_size=49408,
    max_position_embeddings=77,
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    tie_word_embeddings=False,
)
# The 16-channel VAE of SD3 and FLUX.1 (their factors differ).
VAE_16 = dict(
    block_out_channels=(128, 256, 512, 512),
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
# FLUX.1-schnell's transformer (11.9 B parameters: 19 double-stream and 38 single-stream blocks of width 3072).
FLUX_SCHNELL = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=False,
    axes_dims_rope=(16, 56, 56),
)

ARCHS = {
    "tiny-sd1": dict(unet=TINY_UNET, vae=TINY_VAE, text=TINY_TEXT, scheduler=SD15_SCHEDULER),
    "tiny-sd2-v": dict(
        unet={**TINY_UNET, "use_linear_projection": True},
        vae=TINY_VAE,
        text={**TINY_TEXT, "hidden_act": "gelu"},
        scheduler=SD21_V_SCHEDULER,
    ),
    "tiny-sd-turbo": dict(
        unet={**TINY_UNET, "use_linear_projection": True},
        vae=TINY_VAE,
        text={**TINY_TEXT, "hidden_act": "gelu"},
        scheduler=SD_TURBO_SCHEDULER,
    ),
    "tiny-lcm": dict(
        unet={**TINY_UNET, "time_cond_proj_dim": 16}, vae=TINY_VAE, text=TINY_TEXT, scheduler=LCM_SCHEDULER
    ),
    # BK-SDM-style pruned UNet: no mid-block, one fewer resnet per up block than per down block
    "tiny-bk-sdm": dict(
        unet={
            **TINY_UNET,
            "mid_block_type": None,
            "layers_per_block": 1,
            "block_out_channels": (8, 16, 16),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        },
        vae=TINY_VAE,
        text=TINY_TEXT,
        scheduler=SD15_SCHEDULER,
    ),
    # SDXS-style one-step student: cross-attention only in the innermost block, Turbo-like schedule
    "tiny-sdxs": dict(
        unet={
            **TINY_UNET,
            "block_out_channels": (8, 8, 16),
            "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            "use_linear_projection": True,
        },
        vae=TINY_VAE,
        text=TINY_TEXT,
        scheduler=SD_TURBO_SCHEDULER,
    ),
    # an inpainting UNet: latents + mask + masked-image latents in (4 + 1 + 4 channels), as SD-inpainting
    "tiny-sd1-inpaint": dict(
        unet={**TINY_UNET, "in_channels": 9}, vae=TINY_VAE, text=TINY_TEXT, scheduler=SD15_SCHEDULER
    ),
    # SDXL: two text encoders, pooled text and size/crop micro-conditioning into the UNet
    "tiny-sdxl": dict(
        unet=TINY_SDXL_UNET, vae=TINY_SDXL_VAE, text=TINY_TEXT, text_2=TINY_TEXT_2, scheduler=SDXL_SCHEDULER
    ),
    "tiny-sdxl-turbo": dict(
        unet=TINY_SDXL_UNET, vae=TINY_SDXL_VAE, text=TINY_TEXT, text_2=TINY_TEXT_2, scheduler=SDXL_TURBO_SCHEDULER
    ),
    # SDXL inpainting UNet (as diffusers/stable-diffusion-xl-1.0-inpainting-0.1): 4 + 1 + 4 input channels
    "tiny-sdxl-inpaint": dict(
        unet={**TINY_SDXL_UNET, "in_channels": 9},
        vae=TINY_SDXL_VAE,
        text=TINY_TEXT,
        text_2=TINY_TEXT_2,
        scheduler=SDXL_SCHEDULER,
    ),
    # SDXL-Lightning's published scheduler: Euler with trailing timesteps (its name picks the family)
    "tiny-sdxl-lightning": dict(
        unet=TINY_SDXL_UNET,
        vae=TINY_SDXL_VAE,
        text=TINY_TEXT,
        text_2=TINY_TEXT_2,
        scheduler={**SDXL_SCHEDULER, "timestep_spacing": "trailing"},
    ),
    "tiny-sdxl-lcm": dict(
        unet={**TINY_SDXL_UNET, "time_cond_proj_dim": 16},
        vae=TINY_SDXL_VAE,
        text=TINY_TEXT,
        text_2=TINY_TEXT_2,
        scheduler=LCM_SCHEDULER,
    ),
    "tiny-sd3": dict(
        transformer=TINY_SD3_TRANSFORMER,
        vae=TINY_SD3_VAE,
        text=TINY_TEXT,
        text_2=TINY_TEXT_2,
        t5=TINY_T5,
        scheduler=SD3_SCHEDULER,
    ),
    "tiny-flux-schnell": dict(
        flux=TINY_FLUX_TRANSFORMER, vae=TINY_FLUX_VAE, text=TINY_TEXT, t5=TINY_T5, scheduler=FLUX_SCHNELL_SCHEDULER
    ),
    "tiny-flux-dev": dict(
        flux={**TINY_FLUX_TRANSFORMER, "guidance_embeds": True},
        vae=TINY_FLUX_VAE,
        text=TINY_TEXT,
        t5=TINY_T5,
        scheduler=FLUX_DEV_SCHEDULER,
    ),
    "tiny-sana": dict(sana=TINY_SANA_TRANSFORMER, vae=TINY_DC_AE, text=TINY_GEMMA2, scheduler=SANA_SCHEDULER),
    "tiny-sana-sprint": dict(
        sana=TINY_SANA_SPRINT_TRANSFORMER, vae=TINY_DC_AE, text=TINY_GEMMA2, scheduler=SANA_SPRINT_SCHEDULER
    ),
    "tiny-pixart-sigma": dict(
        pixart=TINY_PIXART_TRANSFORMER, vae=TINY_PIXART_VAE, t5=TINY_T5, scheduler=PIXART_SIGMA_SCHEDULER
    ),
    # SDXL-Turbo at full size (~2.6 B UNet parameters; its UNet is SDXL base's), as published by Stability AI.
    "sdxl-turbo": dict(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        text=CLIP_L,
        text_2=CLIP_G,
        scheduler=SDXL_TURBO_SCHEDULER,
    ),
    # SD 2.1-base / SD-Turbo at full size (~0.87 B UNet parameters).
    "sd-turbo": dict(
        unet=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            attention_head_dim=(5, 10, 20, 20),
            cross_attention_dim=1024,
            use_linear_projection=True,
        ),
        vae=dict(
            block_out_channels=(128, 256, 512, 512),
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=768,
            scaling_factor=0.18215,
        ),
        text=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=16,
            num_hidden_layers=23,
            hidden_act="gelu",
            projection_dim=512,
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        scheduler=SD_TURBO_SCHEDULER,
    ),
    # SANA-Sprint 0.6B at 1024 px, as Efficient-Large-Model/Sana_Sprint_0.6B_1024px_diffusers: transformer 593.5 M
    # parameters (SanaSprint_600M_P1_D28), DC-AE f32c32 sana-1.1 312.3 M, Gemma-2-2B-IT decoder 2614.3 M (589.8 M of
    # it the 256000-token embedding).
    "sana-sprint-0.6b": dict(
        sana=dict(
            in_channels=32,
            out_channels=32,
            num_layers=28,
            num_attention_heads=36,
            attention_head_dim=32,
            num_cross_attention_heads=16,
            cross_attention_head_dim=72,
            cross_attention_dim=1152,
            caption_channels=2304,
            mlp_ratio=2.5,
            dropout=0.0,
            attention_bias=False,
            sample_size=32,
            patch_size=1,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            interpolation_scale=None,
            qk_norm="rms_norm_across_heads",
            guidance_embeds=True,
            guidance_embeds_scale=0.1,
            timestep_scale=1.0,
        ),
        vae=dict(
            in_channels=3,
            latent_channels=32,
            attention_head_dim=32,
            encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
            encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
            encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
            decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
            encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
            upsample_block_type="interpolate",
            downsample_block_type="Conv",
            decoder_norm_types="rms_norm",
            decoder_act_fns="silu",
            encoder_out_shortcut=True,
            decoder_in_shortcut=True,
            decoder_conv_act_fn="relu",
            scaling_factor=0.41407,
        ),
        text=dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            attention_bias=False,
            attention_dropout=0.0,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
        ),
        scheduler=SANA_SPRINT_SCHEDULER,
    ),
    # FLUX.1-schnell as black-forest-labs/FLUX.1-schnell, stored in bf16 as published: 11.9 B transformer, T5-XXL
    # 4.76 B, CLIP-L 123 M, VAE 84 M. Too large to build here (24 GB in bf16); benchmarks.export_plan estimates its
    # export from the shapes alone.
    "flux-schnell": dict(
        flux=FLUX_SCHNELL,
        vae=dict(VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
        text=CLIP_L,
        t5=T5_XXL,
        scheduler=FLUX_SCHNELL_SCHEDULER,
        stored="bfloat16",
    ),
    # The same at full width with 2 of its 19 double-stream blocks, 4 of its 38 single-stream ones and 2 of T5-XXL's
    # 24 layers (1.30 B + 0.52 B parameters): the export's memory rule, measured where it fits.
    "flux-schnell-reduced": dict(
        flux=dict(FLUX_SCHNELL, num_layers=2, num_single_layers=4),
        vae=dict(VAE_16, scaling_factor=0.3611, shift_factor=0.1159),
        text=CLIP_L,
        t5=dict(T5_XXL, num_layers=2),
        scheduler=FLUX_SCHNELL_SCHEDULER,
        stored="bfloat16",
    ),
    # SD3.5-medium as stabilityai/stable-diffusion-3.5-medium: MMDiT-X transformer 2.47 B (24 blocks of width 1536,
    # the first 13 with a second self-attention), CLIP-L, CLIP-G, T5-XXL; stored in 16-bit floats as published.
    "sd3.5-medium": dict(
        transformer=dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=384,
            qk_norm="rms_norm",
            dual_attention_layers=tuple(range(13)),
        ),
        vae=dict(VAE_16, scaling_factor=1.5305, shift_factor=0.0609),
        text=CLIP_L,
        text_2=CLIP_G,
        t5=T5_XXL,
        scheduler=SD3_SCHEDULER,
        stored="bfloat16",
    ),
}

# Words the built tokenizer knows whole (the rest falls back to bytes).
WORDS = (
    "a an the of on at in with and photo picture red green blue yellow orange purple white black "
    "circle square triangle star small large left right top bottom center background cat dog".split()
)


def build_random_pipeline(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a diffusers pipeline folder with random weights for `arch` (see ARCHS), in the dtype its entry
    says the published model is stored in (`stored`: built a component at a time; fp32 where it says none)."""
    if "stored" in ARCHS[arch]:
        return _save_by_component(arch, Path(out_dir), seed)
    pipe, tokenizer_folders = random_pipeline(arch, out_dir, seed)
    return _save(pipe, Path(out_dir), tokenizer_folders)


def _save_by_component(arch: str, out: Path, seed: int) -> Path:
    """The pipeline laid out on the meta device, then each model made in the stored dtype, saved and freed
    before the next: SD3.5-medium's T5-XXL (9.5 GB in bf16) and transformer (4.9 GB) are never held together,
    nor anything in fp32 (T5-XXL alone is 19 GB)."""
    import gc

    import torch

    with torch.device("meta"):
        pipe, tokenizer_folders = random_pipeline(arch, out, seed)
    dtype = getattr(torch, ARCHS[arch]["stored"])
    pipe.save_config(out)  # model_index.json, as save_pretrained writes it
    for i, (name, component) in enumerate(pipe.components.items()):
        if component is None:
            continue
        if not isinstance(component, torch.nn.Module):
            component.save_pretrained(out / name)  # tokenizers and the scheduler
            continue
        torch.manual_seed(seed + i)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # parameters are made in the stored dtype, never in fp32 first
        try:
            model = _made_like(component)
        finally:
            torch.set_default_dtype(default)
        model.to(dtype)  # buffers made from numpy (SD3's positional table) are fp32 still; parameters stay as they are
        model.save_pretrained(out / name)
        del model
        gc.collect()
    for folder in tokenizer_folders:
        shutil.rmtree(folder)
    return out


def _made_like(meta_module):
    """A module of `meta_module`'s class and config with real, freshly initialised weights on the CPU."""
    if hasattr(meta_module, "from_config"):  # diffusers' models
        return type(meta_module).from_config(meta_module.config)
    return type(meta_module)(meta_module.config)  # transformers' models


def random_pipeline(arch: str, out_dir: str | Path, seed: int = 0):
    """(the pipeline with random weights for `arch`, the tokenizer sources built for it under `out_dir`).
    Built under `torch.device("meta")`, its modules hold shapes and no weights (benchmarks.export_plan)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    spec = ARCHS[arch]
    families = (
        ("transformer", _sd3_pipeline),
        ("flux", _flux_pipeline),
        ("sana", _sana_pipeline),
        ("pixart", _pixart_pipeline),
    )
    for key, build in families:
        if key in spec:
            return build(spec, out_dir, seed)
    return _sd_pipeline(spec, out_dir, seed)


def _sd_pipeline(spec: dict, out_dir: str | Path, seed: int = 0):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline when `spec` has a second text encoder) with random
    weights."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out_dir)
    tok_dir = build_clip_tokenizer(out / "_tokenizer_src", WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = _clip_encoder(CLIPTextModel, spec["text"], tokenizer, seed + 2)
    scheduler = _scheduler(spec)
    if "text_2" in spec:
        tok_dir_2 = build_clip_tokenizer(out / "_tokenizer_2_src", WORDS, pad_token="!")
        tokenizer_2 = CLIPTokenizer.from_pretrained(tok_dir_2)
        text_encoder_2 = _clip_encoder(CLIPTextModelWithProjection, spec["text_2"], tokenizer_2, seed + 3)
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        tok_dir_2 = None
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return pipe, [f for f in (tok_dir, tok_dir_2) if f is not None]


def _sd3_pipeline(spec: dict, out_dir: str | Path, seed: int = 0):
    """A StableDiffusion3Pipeline with random weights for an ARCHS entry with a `transformer`."""

    import torch
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5TokenizerFast

    out = Path(out_dir)
    folders = [
        build_clip_tokenizer(out / "_tokenizer_src", WORDS),
        build_clip_tokenizer(out / "_tokenizer_2_src", WORDS, pad_token="!"),  # CLIP-G pads with "!", as SDXL's
        build_t5_tokenizer(out / "_tokenizer_3_src", WORDS),
    ]
    tokenizers = [CLIPTokenizer.from_pretrained(folders[0]), CLIPTokenizer.from_pretrained(folders[1])]
    encoders = [
        _clip_encoder(CLIPTextModelWithProjection, spec[key], tok, seed + 2 + i)
        for i, (tok, key) in enumerate(zip(tokenizers, ("text", "text_2")))
    ]
    tokenizer_3 = T5TokenizerFast.from_pretrained(folders[2])
    t5 = _t5_encoder(spec["t5"], tokenizer_3, seed + 4)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**spec["transformer"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec["vae"])
    scheduler = _scheduler(spec)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )
    return pipe, folders


def _clip_encoder(model_class, spec: dict, tokenizer, seed: int):
    """A random CLIP text encoder (`model_class`: with or without projection) for `tokenizer`'s special ids."""
    import torch
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    return model_class(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **spec,
        )
    )


def _scheduler(spec: dict):
    """The ARCHS entry's scheduler, from its config with the class name diffusers writes; its tables on the CPU
    even where the modules are built on the meta device (random_pipeline)."""
    import diffusers
    import torch

    config = dict(spec["scheduler"])
    with torch.device("cpu"):
        return getattr(diffusers, config.pop("_class_name")).from_config(config)


def _save(pipe, out: Path, tokenizer_folders: list[Path]) -> Path:
    """Saves the pipeline to `out` and removes the tokenizer sources it was built from."""
    pipe.save_pretrained(out)
    for folder in tokenizer_folders:
        shutil.rmtree(folder)
    return out


def _t5_encoder(spec: dict, tokenizer, seed: int):
    """A random T5 encoder for `tokenizer`'s vocabulary (SD3's text_encoder_3, FLUX's text_encoder_2)."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    # a spec's own vocab_size (the real one, so the embedding has its real size) wins over the tokenizer's length
    spec = {"vocab_size": len(tokenizer), **spec}
    return T5EncoderModel(T5Config(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **spec))


def _flux_pipeline(spec: dict, out_dir: str | Path, seed: int = 0):
    """A FluxPipeline with random weights for an ARCHS entry with a `flux` transformer."""

    import torch
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    out = Path(out_dir)
    folders = [build_clip_tokenizer(out / "_tokenizer_src", WORDS), build_t5_tokenizer(out / "_tokenizer_2_src", WORDS)]
    tokenizer, tokenizer_2 = CLIPTokenizer.from_pretrained(folders[0]), T5TokenizerFast.from_pretrained(folders[1])
    text_encoder = _clip_encoder(CLIPTextModel, spec["text"], tokenizer, seed + 2)
    text_encoder_2 = _t5_encoder(spec["t5"], tokenizer_2, seed + 4)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**spec["flux"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec["vae"])
    scheduler = _scheduler(spec)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return pipe, folders


def _sana_pipeline(spec: dict, out_dir: str | Path, seed: int = 0):
    """A SanaPipeline (SanaSprintPipeline for an SCM scheduler) with random weights for an ARCHS entry
    with a `sana` transformer."""

    import torch
    from diffusers import AutoencoderDC, SanaPipeline, SanaSprintPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    out = Path(out_dir)
    folder = build_gemma_tokenizer(out / "_tokenizer_src", WORDS)
    tokenizer = GemmaTokenizerFast.from_pretrained(folder)
    torch.manual_seed(seed + 2)
    # A spec's own vocab_size (the real one, so the embedding has its real size) wins over the tokenizer's length.
    text = {"vocab_size": len(tokenizer), **spec["text"]}
    text_encoder = Gemma2Model(
        Gemma2Config(
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            attn_implementation="eager",
            **text,
        )
    )
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(**spec["sana"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(**spec["vae"])
    scheduler = _scheduler(spec)
    pipeline = SanaSprintPipeline if type(scheduler).__name__ == "SCMScheduler" else SanaPipeline
    pipe = pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipe, [folder]


def _pixart_pipeline(spec: dict, out_dir: str | Path, seed: int = 0):
    """A PixArtSigmaPipeline with random weights for an ARCHS entry with a `pixart` transformer."""

    import torch
    from diffusers import AutoencoderKL, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    folder = build_t5_tokenizer(out / "_tokenizer_src", WORDS)
    tokenizer = T5TokenizerFast.from_pretrained(folder)
    text_encoder = _t5_encoder(spec["t5"], tokenizer, seed + 2)
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(**spec["pixart"])
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**spec["vae"])
    scheduler = _scheduler(spec)
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    return pipe, [folder]


# tiny autoencoders by the latents they decode: TAESD (SD 1/2, SDXL's TAESDXL alike) takes 4 channels; TAESD3 (and
# FLUX.1's TAEF1, the same architecture) 16. Both are diffusers' AutoencoderTiny defaults otherwise.
TINY_AUTOENCODERS = {"taesd": 4, "taesd3": 16}


def build_random_taesd(out_dir: str | Path, seed: int = 0, arch: str = "taesd") -> Path:
    """Saves an AutoencoderTiny with TAESD's (or TAESD3's) architecture and random weights: the full-size tiny
    decoder for benchmarks (`--tiny-decoder OUT_DIR` at export)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny(latent_channels=TINY_AUTOENCODERS[arch]).save_pretrained(out_dir)
    return Path(out_dir)


# ControlNets' zero convolutions start at zero (training grows them); random ones get this spread, so that control
# visibly changes a tiny model's images
CONTROLNET_ZERO_CONV_STD = 0.3


def build_random_controlnet(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a ControlNetModel for `arch`'s UNet (ControlNetModel.from_unet on the UNet build_random_pipeline makes
    with the same seed): the UNet's encoder weights, a conditioning embedding downsampling as the VAE does, and
    random zero convolutions."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    spec = ARCHS[arch]
    if "unet" not in spec:
        raise ValueError(f"{arch!r} has no UNet: ControlNets are for the UNet families")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae_downsamplings = len(spec["vae"]["block_out_channels"]) - 1
    torch.manual_seed(seed + 10)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8,) * (vae_downsamplings + 1))
    with torch.no_grad():
        zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
        for conv in [*zero_convs, controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0.0, CONTROLNET_ZERO_CONV_STD)
            conv.bias.normal_(0.0, CONTROLNET_ZERO_CONV_STD)
    controlnet.save_pretrained(out_dir)
    return Path(out_dir)


# A CLIP vision encoder as small as the tiny text encoders; its image size is what diffusers' load_ip_adapter sizes
# the CLIPImageProcessor it creates to (224 for the published encoders)
TINY_IMAGE_ENCODER = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    image_size=32,
    patch_size=8,
    projection_dim=24,
)
IP_ADAPTER_TOKENS = 4  # the plain IP-Adapter's image tokens (diffusers fixes them at 4 for "proj.weight")
IP_ADAPTER_WEIGHT_NAME = "ip-adapter_tiny.safetensors"
IP_ADAPTER_SUBFOLDER = "models"  # as h94/IP-Adapter: models/<weights> beside models/image_encoder


def build_random_ip_adapter(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a random plain IP-Adapter for `arch`'s UNet as diffusers' load_ip_adapter finds one:
    <out_dir>/models/ip-adapter_tiny.safetensors ("image_proj." and "ip_adapter." keys, the original numbering of
    the cross-attention layers) beside <out_dir>/models/image_encoder (a CLIPVisionModelWithProjection)."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    spec = ARCHS[arch]
    if "unet" not in spec:
        raise ValueError(f"{arch!r} has no UNet: IP-Adapters are for the UNet families")
    folder = Path(out_dir) / IP_ADAPTER_SUBFOLDER
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_IMAGE_ENCODER))
    encoder.save_pretrained(folder / "image_encoder")
    unet = UNet2DConditionModel(**spec["unet"])
    cross, embed = unet.config.cross_attention_dim, TINY_IMAGE_ENCODER["projection_dim"]
    generator = torch.Generator().manual_seed(seed + 20)

    def rand(*shape, std=0.3):
        return torch.randn(*shape, generator=generator) * std

    weights = {
        "image_proj.proj.weight": rand(IP_ADAPTER_TOKENS * cross, embed),
        "image_proj.proj.bias": rand(IP_ADAPTER_TOKENS * cross),
        "image_proj.norm.weight": 1.0 + rand(cross, std=0.1),
        "image_proj.norm.bias": rand(cross, std=0.1),
    }
    modules = dict(unet.named_modules())
    key_id = 1  # diffusers' numbering: every attention layer counted, the cross-attention ones odd
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = modules[name.removesuffix(".processor")].to_k.weight.shape[0]
        weights[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        weights[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / IP_ADAPTER_WEIGHT_NAME))
    return Path(out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", choices=sorted([*ARCHS, *TINY_AUTOENCODERS]))
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.arch in TINY_AUTOENCODERS:
        print(build_random_taesd(args.out_dir, args.seed, args.arch))
    else:
        print(build_random_pipeline(args.arch, args.out_dir, args.seed))


if __name__ == "__main__":
    main()
