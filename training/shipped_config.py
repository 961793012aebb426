"""Configuration of the model that ships with edgediff (nanoGPT-style: each field with its reason).

A standard diffusers Stable Diffusion layout, scaled to the coloured-shapes domain so that the
whole recipe (VAE, teacher, LCM distillation, tiny decoder) trains in a few hours on 2 CPU cores.
The runs behind these choices and their figures are in models/MODEL_CARD.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .shapes import COLOURS, POSITIONS, SHAPES, SIZES

# Every word of the domain is one token; anything else falls back to byte tokens.
VOCABULARY = ["a", "at", "the", "on", "background", *COLOURS, *SHAPES, *SIZES, *POSITIONS]


@dataclass
class ShippedConfig:
    image_size: int = 64  # the domain's images; small enough for CPU training and fast inference
    max_length: int = 16  # the longest caption is 13 tokens with BOS/EOS; 77 would only cost attention time
    # --- VAE (AutoencoderKL) ---
    vae_channels: tuple = (
        16,
        32,
        64,
    )  # three levels: downsampling by 4, a 16x16x4 latent; 16 wide at 64x64 keeps it fast
    vae_layers_per_block: int = 1  # flat colours need little depth
    vae_kl_weight: float = 1e-6  # as SD's VAE: a nearly deterministic latent, just regularised
    vae_steps: int = 4500  # a third of this left halos and corner blotches
    vae_batch: int = 16
    vae_lr: float = 1e-3
    # --- text encoder (CLIPTextModel), trained jointly with the teacher ---
    text_hidden: int = 64  # a vocabulary of ~25 words needs no more
    text_layers: int = 2  # binding "red" to "circle" vs "background" needs context: two layers
    text_heads: int = 4
    # --- UNet (UNet2DConditionModel) ---
    unet_channels: tuple = (32, 64, 128)  # 16x16 (no attention) -> 8x8 -> 4x4 (cross-attention); 4.1 M parameters
    unet_attention_head_dim: int = 8
    unet_layers_per_block: int = 1
    teacher_steps: int = 12000  # at half this it still drew squares with rounded corners
    teacher_batch: int = 64
    teacher_lr: float = 6e-4
    cfg_dropout: float = 0.1  # classifier-free guidance: the empty prompt this often
    caption_omit: float = 0.3  # size/position left out of the caption this often (then drawn at random)
    min_snr_gamma: float = 5.0  # Min-SNR loss weighting (arXiv:2303.09556), as min(snr + 1, gamma) / (snr + 1) for v:
    #                             full weight at the pure-noise end, where the layout is decided
    offset_noise: float = 0.0  # per-channel constant added to the noise; zero terminal SNR makes it unneeded
    # --- LCM distillation (Luo et al. 2023, Algorithm 1) ---
    guidance_embedding_dim: int = 64  # time_cond_proj_dim: w enters as a sinusoidal embedding
    # Longer distillation sharpens 1 step but adds spikes (circles read as triangles, triangles as stars) to
    # 4 steps; 500 reads best at 1, 2 and 4 steps together (students compared along one recipe: MODEL_CARD.md).
    distill_steps: int = 500
    distill_batch: int = 32
    distill_lr: float = 1e-4
    guidance_range: tuple = (1.0, 6.0)  # w sampled here (guidance_scale = w + 1 at inference)
    skip_steps: int = 20  # k: the teacher's DDIM jump = 1000 / original_inference_steps (50)
    ema_decay: float = 0.95  # target network, as LCM
    # --- VAE decoder fine-tune (frozen encoder) ---
    decoder_steps: int = 6000  # the VAE's own training left rounded corners that the checker misreads
    decoder_batch: int = 16
    decoder_lr: float = 3e-4
    # --- tiny decoder (AutoencoderTiny-style) ---
    tiny_channels: tuple = (32, 32, 32)
    tiny_steps: int = 1500
    tiny_batch: int = 16
    tiny_lr: float = 1e-3
    # --- data ---
    train_images: int = 40000  # rendered once, encoded once; seeds below 10**6 are training seeds
    seed: int = 0
    default_guidance: float = 4.0  # guidance_scale the bundle defaults to (w = 3)
    # SD's training schedule rescaled to zero terminal SNR, with v-prediction (arXiv:2305.08891). With SD's own
    # schedule the last timestep keeps some of the image, so in training the shape's place can be read from the
    # noisy input: earlier models learnt to take it from the noise and ignored "at the left". At zero SNR the
    # first step sees pure noise and must take the place from the text.
    scheduler: dict = field(
        default_factory=lambda: {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "rescale_betas_zero_snr": True,
            "prediction_type": "v_prediction",
            "clip_sample": False,
            "set_alpha_to_one": True,
            "steps_offset": 1,
            "original_inference_steps": 50,
            "timestep_scaling": 10.0,
            "timestep_spacing": "trailing",
        }
    )  # trailing: the teacher's DDIM starts at the pure-noise step too

    def to_dict(self) -> dict:
        return asdict(self)


EVAL_SEED = 10**6 + 7  # checker prompts come from seeds the training never used
