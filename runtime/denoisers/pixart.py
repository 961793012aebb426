"""PixArt-Sigma's denoiser: a DiT over the SD VAE's latents, conditioned as diffusers' PixArtSigmaPipeline does
(clean_caption False).

Text: prompts and negative prompts lower-cased and stripped, padded to max_sequence_length T5 tokens, T5's last
hidden state with its attention mask (the mask goes to the transformer as encoder_attention_mask): SANA's
conditioning without its instruction prefix, so SANA's conditioner serves both. Timestep: the sampler's, once per
batch row. The transformer predicts epsilon and a learned variance (out_channels = 2 x latent channels): the
sampler takes the first half, as the pipeline's noise_pred.chunk(2, dim=1)[0].
"""

from __future__ import annotations

import numpy as np

from .sana import SanaDenoiser


class PixArtDenoiser(SanaDenoiser):
    def __init__(self, bundle, sessions):
        super().__init__(bundle, sessions)
        self.latent_channels = int(bundle.manifest.latent_channels)

    def prediction(self, output: np.ndarray) -> np.ndarray:
        # the pipeline's test: an output twice the latents' width carries the variance in its second half
        if output.shape[1] // 2 == self.latent_channels:
            return output[:, : self.latent_channels]
        return output
