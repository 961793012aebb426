"""Control-image preprocessors in numpy and pillow (no OpenCV, no torch).

Canny edges, as the canny ControlNets were trained on (their annotator is OpenCV's `cv2.Canny(image, low, high)`):
3x3 Sobel gradients of the grey image (edges replicated), |gx| + |gy| magnitudes, thinning to local maxima across
the gradient direction, then hysteresis: pixels above `high` are edges, and pixels above `low` are edges where they
touch (8-connected) an edge. White edges on black, RGB, as the ControlNet annotators write them.

Depth, pose and other maps are not computed here: their estimators are neural networks; make them with the tool of
your choice and pass the map as the control image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .image import load_image

CANNY_LOW, CANNY_HIGH = 100.0, 200.0  # the thresholds ControlNet's canny examples use, on 0-255 grey levels
_SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
_TAN_22_5 = np.tan(np.deg2rad(22.5))


def canny_image(image, low_threshold: float = CANNY_LOW, high_threshold: float = CANNY_HIGH) -> Image.Image:
    """An RGB edge map (255 on edges, 0 elsewhere) of `image` (PIL image, path or HWC array), the input's size."""
    grey = np.asarray(load_image(image).convert("L"), dtype=np.float32)
    edges = canny(grey, low_threshold, high_threshold)
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def canny(grey: np.ndarray, low_threshold: float = CANNY_LOW, high_threshold: float = CANNY_HIGH) -> np.ndarray:
    """A boolean (H, W) edge mask of an (H, W) grey image in 0-255."""
    if low_threshold > high_threshold:
        low_threshold, high_threshold = high_threshold, low_threshold  # as OpenCV: the order does not matter
    gx, gy = _correlate3(grey, _SOBEL_X), _correlate3(grey, _SOBEL_X.T)
    magnitude = np.abs(gx) + np.abs(gy)
    thin = magnitude * _local_maxima(magnitude, gx, gy)
    strong = thin > high_threshold
    candidate = thin > low_threshold
    return _hysteresis(strong, candidate)


def _correlate3(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    padded = np.pad(image, 1, mode="edge")
    h, w = image.shape
    return sum(kernel[i, j] * padded[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _neighbour(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a shifted so that out[y, x] = a[y + dy, x + dx] (zeros past the border)."""
    padded = np.pad(a, 1)
    h, w = a.shape
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _local_maxima(m: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Where the magnitude is a maximum across the gradient direction, quantised to 0, 45, 90 or 135 degrees. As
    OpenCV: along x and y, of two equal neighbours the first wins (`>` on one side, `>=` on the other), so edges
    stay one pixel wide; along the diagonals both comparisons are strict."""
    ax, ay = np.abs(gx), np.abs(gy)
    horizontal = ay <= ax * _TAN_22_5  # gradient along x: compare left and right
    vertical = ax <= ay * _TAN_22_5
    same_sign = (gx * gy) > 0  # diagonal direction: down-right when gx and gy agree in sign (y grows downwards)
    keep = np.zeros(m.shape, bool)
    for where, (dy, dx), strict in (
        (horizontal, (0, 1), False),
        (vertical, (1, 0), False),
        (~horizontal & ~vertical & same_sign, (1, 1), True),
        (~horizontal & ~vertical & ~same_sign, (1, -1), True),
    ):
        after = _neighbour(m, dy, dx)
        keep |= where & (m > _neighbour(m, -dy, -dx)) & ((m > after) if strict else (m >= after))
    return keep


def _hysteresis(strong: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Grows the strong edges through 8-connected candidate pixels until nothing changes."""
    edges = strong.copy()
    while True:
        grown = candidate & _dilate(edges)
        if np.array_equal(grown, edges):
            return edges
        edges = grown | edges


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out |= _neighbour(mask, dy, dx)
    return out
