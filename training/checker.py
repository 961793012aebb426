"""Reads a generated image back into attributes, with no learned model: the quality checker.

Background: the palette colour nearest the border's median. Shape colour: the palette colour
nearest the median of the pixels far from the background. Shape pixels: the largest connected
region closer to the shape colour than to the background. Shape: convexity (solidity) and fill of
the bounding box. Size: the shape's area. Position: its centroid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shapes import COLOURS, IMAGE_SIZE, POSITIONS, SIZES

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background beyond which a pixel belongs to the shape
MIN_SHAPE_PIXELS = 12  # fewer than this: no shape was drawn


@dataclass
class Reading:
    background: str
    colour: str | None
    shape: str | None
    size: str | None
    position: str | None


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _hull_area(points: np.ndarray) -> float:
    # Andrew's monotone chain, then the shoelace formula (a few hundred points: numpy is plenty).
    pts = sorted(set(map(tuple, points)))
    if len(pts) < 3:
        return float(len(pts))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = np.array(lower[:-1] + upper[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1)))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (a flood fill; 64x64 masks need nothing faster)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best


def _segment(img: np.ndarray):
    """(background name, shape colour name or None, shape pixels or None)."""
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = _nearest(np.median(border, axis=0))
    bg = _PALETTE[_NAMES.index(background)]
    candidates = np.sqrt(((img - bg) ** 2).sum(-1)) > FOREGROUND_DISTANCE
    if candidates.sum() < MIN_SHAPE_PIXELS:
        return background, None, None
    colour = _nearest(np.median(img[candidates], axis=0))
    if colour == background:
        return background, None, None
    # Two-class split (closer to the shape's colour than to the background's), then the largest
    # connected region: soft edges and stray specks of a decoder don't count as shape.
    fg = _PALETTE[_NAMES.index(colour)]
    mask = _largest_component(((img - fg) ** 2).sum(-1) < ((img - bg) ** 2).sum(-1))
    return background, colour, (mask if mask.sum() >= MIN_SHAPE_PIXELS else None)


def shape_mask(image) -> np.ndarray:
    """Boolean (H, W) mask of the shape's pixels (all False when no shape is found)."""
    img = np.asarray(image, dtype=np.float32)[..., :3]
    _, _, mask = _segment(img)
    return np.zeros(img.shape[:2], dtype=bool) if mask is None else mask


def read(image) -> Reading:
    img = np.asarray(image, dtype=np.float32)[..., :3]
    n = img.shape[0]
    background, colour, mask = _segment(img)
    if colour is None or mask is None:
        return Reading(background, colour, None, None, None)
    ys, xs = np.nonzero(mask)
    # pixel corners, so that the hull of a filled square has the square's area
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    area = float(mask.sum())
    solidity = area / max(_hull_area(corners), 1.0)
    bbox_fill = area / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    if solidity < 0.8:
        shape = "star"
    elif bbox_fill > 0.9:
        shape = "square"
    elif bbox_fill > 0.66:
        shape = "circle"
    else:
        shape = "triangle"
    scale = (n / IMAGE_SIZE) ** 2
    # threshold between the two sizes' typical areas (geometric mean of circle areas)
    small_area, large_area = (np.pi * (SIZES[s] * IMAGE_SIZE) ** 2 * scale for s in ("small", "large"))
    size = "large" if area > np.sqrt(small_area * large_area) * (0.8 if shape == "star" else 1.0) else "small"
    cx, cy = xs.mean() / n, ys.mean() / n
    position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    return Reading(background, colour, shape, size, position)
