"""Configuration of the second shipped model, a flow-matching SD3-family transformer (nanoGPT-style: each field
with its reason).

A diffusers StableDiffusion3Pipeline layout scaled to the coloured-shapes domain: the shipped model's VAE as it is,
two tiny CLIP encoders with projection (pooled text) and a tiny T5, all trained with a small MMDiT; then reflow
to two re-noised steps and an adversarial stage against the teacher's features. Trained by training/flow.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class FlowConfig:
    image_size: int = 64  # the domain's images; the shipped VAE makes them 16x16x4 latents
    max_length: int = 16  # CLIP tokens, as the shipped model: the longest caption is 13 with BOS/EOS
    # T5 tokens. StableDiffusion3Pipeline and edgediff's SD3 export default to 256, but then the transformer sees
    # 16 + 256 + 64 tokens instead of 16 + 16 + 64: a teacher step costs 6x (3.5 s instead of 0.6 s on one core).
    # The longest caption is 12 T5 tokens with its end token; callers pass max_sequence_length=16.
    t5_length: int = 16
    # --- text encoders, trained jointly with the teacher ---
    # CLIP-L narrower than CLIP-G, their sum below T5's width: SD3's own proportions (768 + 1280 < 4096), so the
    # runtime's zero padding of the CLIP states to the joint width is exercised.
    clip_l_hidden: int = 32
    clip_g_hidden: int = 48
    clip_layers: int = 2  # SD3 takes the penultimate layer: one layer of context, the last feeds the pooled text
    clip_heads: int = 4
    t5_hidden: int = 96  # = the transformer's joint_attention_dim
    t5_layers: int = 2  # binding "red" to "circle" vs "background" needs context: two layers, as the shipped CLIP
    t5_heads: int = 6  # 16 wide each
    t5_ff: int = 192
    t5_buckets: int = 8  # relative-position buckets: 16 tokens need few (T5's 32 cover 128 positions)
    # --- transformer (SD3Transformer2DModel) ---
    patch_size: int = 2  # 16x16 latents -> 64 image tokens
    # 4 joint blocks of width 128: 2.3 M parameters. One image at 1 step through the bundle: ~13 ms on 2 cores
    # (transformer ~4.5 ms, VAE decoder ~5 ms, encoders ~3 ms); 6 blocks measured ~18 ms and 1.5x the training
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    qk_norm: str = "rms_norm"  # as SD3's high-resolution finetune and SD3.5: keeps attention logits bounded
    # --- teacher: rectified flow (Esser et al. 2024, arXiv:2403.03206) ---
    # 14,000 x 64 = 22 passes over the 40,000 images; ~0.5 s per step on 2 cores, about 2 hours. The UNet teacher
    # took 12,000; this one, at 3,000 steps, still drew blobs (28 guided steps: shape read right 42% of the time)
    teacher_steps: int = 14000
    teacher_batch: int = 64
    teacher_lr: float = 3e-4  # lower than the UNet's 6e-4: transformers are less forgiving; warmup + cosine
    teacher_warmup: int = 500
    ema_decay: float = 0.999  # of transformer and encoders together, so that the saved pair belongs together
    # t = sigmoid(N(mean, std)): SD3's logit-normal sampler (sec. 3.1), "rf/lognorm(0.00, 1.00)" the one it kept
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # SD3's resolution-dependent timestep shift, for training and sampling alike. Its rule, sqrt(tokens / 256, the
    # tokens at 256 px), gives 0.5 for our 64; 1.0 keeps the pure-noise end, where the layout is decided, sampled.
    shift: float = 1.0
    cfg_dropout: float = 0.1  # classifier-free guidance: the empty prompt through all three encoders this often
    # T5's states zeroed this often, teacher and student (SD3 drops each encoder independently for the same
    # reason): bundles exported with --no-t5 (zeros in T5's place, as diffusers without text_encoder_3) still draw
    t5_drop: float = 0.1
    caption_omit: float = 0.3  # size/position left out of the caption this often (then drawn at random)
    # --- distillation: reflow on teacher pairs (Liu et al. 2022, arXiv:2209.03003; InstaFlow, arXiv:2309.06380) ---
    guidance: float = 4.0  # CFG baked into the pairs (the shipped model's default); the student runs without CFG
    pair_count: int = 10000  # (noise, teacher sample) pairs, ~1 per caption (2,240 scenes x 4 caption forms)
    pair_steps: int = 28  # the teacher's Euler ODE steps per pair (SD3's default count): ~0.1-0.2 s per pair
    pair_chunk: int = 250  # pairs per saved file: an interrupted pairs stage loses at most one chunk
    distill_steps: int = 3000  # ~19 passes over the pairs; ~0.4-0.6 s per step
    distill_batch: int = 64
    distill_lr: float = 1e-4
    # t = 1 exactly this often (InstaFlow's one-step distillation on the same pairs), else t ~ U(0, 1) (reflow)
    one_step_fraction: float = 0.5
    # The student samples in two steps, the second re-noised (consistency models' multistep sampling, Song et al.
    # 2023, arXiv:2303.01469, Algorithm 1; FlowMatchEulerDiscreteScheduler's stochastic_sampling): its x0 from t = 1
    # is noised again with fresh noise to `second_sigma` and denoised once more. One reflow step alone blurred
    # corners and points (squares read as circles, stars as triangles: shape 78%). Fresh noise is not the pairs'
    # coupled noise, so this share of each batch is a teacher sample noised with fresh noise at
    # sigma ~ U(renoise_low, renoise_high): the states the second step sees, around `second_sigma`
    renoise_fraction: float = 0.25
    renoise_low: float = 0.4
    renoise_high: float = 0.8
    default_steps: int = 2  # 1 -> second_sigma -> 0: ~20 ms an image on 2 cores, under the 25 ms floor
    # diffusers' grid for 2 steps is 1 -> 0.001 (no second step to speak of); shift_terminal stretches it to end here
    second_sigma: float = 0.6
    # --- adversarial fine-tuning of the student (LADD, arXiv:2403.12015; training/flow_adversarial.py) ---
    adv_steps: int = 1000  # ~1.1 s per step on 2 cores, ~20 minutes
    adv_batch: int = 32  # each step runs the student twice and the teacher on 2 x batch samples, twice
    adv_lr: float = 1e-5  # a tenth of reflow's: the student is already close; GANs diverge at high rates
    adv_head_lr: float = 3e-4  # the heads start from nothing and must keep up with the student
    adv_head_width: int = 64  # half the transformer's width: a head reads features, it need not rebuild them
    adv_t_high: float = 0.6  # the teacher reads samples re-noised to t ~ U(0, this): shapes' edges, not layouts
    # times the gradient-norm ratio at the last layer (adversarial vs regression). 0.5 (with heads at 1e-4) left
    # 2-step shape where reflow had it (83.0%); 2.0 lifted it to 86%
    adv_weight: float = 2.0
    adv_weight_limit: float = 10.0
    # --- data ---
    train_images: int = 40000  # training.train's data stage: the same 40,000 images from seed 0 as the shipped model
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)
