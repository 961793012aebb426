"""Latents to pixels: one image at a time, whole or in overlapping tiles blended together.

Tiling bounds the decoder's memory by the tile, not the image (the VAE decoder dominates memory at
large sizes); tiles overlap and are blended with linear ramps, so no seam shows. Hand-written: it is
a few lines of numpy, and onnxruntime has no tiled execution of its own.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .options import MIN_TILE
from .session import GraphSession

DEFAULT_OVERLAP_FRACTION = 0.25  # of the tile, on each shared side


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]  # the last tile sits flush with the edge


def _ramp(size: int, fade_in: int, fade_out: int) -> np.ndarray:
    """1 inside, rising over `fade_in` pixels at the start and falling over `fade_out` at the end."""
    w = np.ones(size, dtype=np.float32)
    if fade_in:
        w[:fade_in] = (np.arange(fade_in, dtype=np.float32) + 0.5) / fade_in
    if fade_out:
        w[size - fade_out :] = np.minimum(
            w[size - fade_out :], ((np.arange(fade_out, dtype=np.float32) + 0.5) / fade_out)[::-1]
        )
    return w


def decode(
    session: GraphSession, latents: np.ndarray, tile: int | None = None, overlap: int | None = None, run_options=None
) -> np.ndarray:
    """Decodes (B, C, h, w) latents to (B, 3, H, W), one image at a time; `tile` in latent cells enables tiling."""
    if tile is None:
        return np.concatenate(
            [session.run(run_options, latent_sample=latents[j : j + 1])[0] for j in range(len(latents))]
        )
    if tile < MIN_TILE:
        raise InputError("tile_size", minimum=MIN_TILE, value=tile)
    overlap = max(1, int(tile * DEFAULT_OVERLAP_FRACTION)) if overlap is None else overlap
    overlap = min(overlap, tile - 1)
    return np.concatenate(
        [_decode_tiled(session, latents[j : j + 1], tile, overlap, run_options) for j in range(len(latents))]
    )


def _decode_tiled(session, latent, tile, overlap, run_options) -> np.ndarray:
    _, _, h, w = latent.shape
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
    out = weight = None
    for y in ys:
        for x in xs:
            piece = session.run(run_options, latent_sample=latent[:, :, y : y + tile, x : x + tile])[0]
            if out is None:
                scale = piece.shape[-1] // min(tile, w)  # pixels per latent cell
                out = np.zeros((1, piece.shape[1], h * scale, w * scale), dtype=np.float32)
                weight = np.zeros((h * scale, w * scale), dtype=np.float32)
            th, tw = piece.shape[-2:]
            # fade only on sides shared with a neighbour, over the pixels actually shared
            up = (ys[ys.index(y) - 1] + tile - y) * scale if y != ys[0] else 0
            down = (y + tile - ys[ys.index(y) + 1]) * scale if y != ys[-1] else 0
            left = (xs[xs.index(x) - 1] + tile - x) * scale if x != xs[0] else 0
            right = (x + tile - xs[xs.index(x) + 1]) * scale if x != xs[-1] else 0
            wgt = np.outer(_ramp(th, up, down), _ramp(tw, left, right))
            py, px = y * scale, x * scale
            out[:, :, py : py + th, px : px + tw] += piece * wgt
            weight[py : py + th, px : px + tw] += wgt
    return out / weight
