"""The Canny preprocessor (numpy + pillow): thin edges where the grey level steps, hysteresis between its two
thresholds, and an RGB map of the input's size."""

import numpy as np
from PIL import Image

from edgediff.runtime.preprocess import canny, canny_image


def _square(level: float, size: int = 48, lo: int = 12, hi: int = 36) -> np.ndarray:
    grey = np.zeros((size, size), np.float32)
    grey[lo:hi, lo:hi] = level
    return grey


def test_edges_trace_the_square_one_pixel_wide():
    edges = canny(_square(255.0))
    ys, xs = np.nonzero(edges)
    assert edges.any()
    # only on the square's outline (the step lies between rows/columns 11 and 12, 35 and 36)
    on_outline = np.minimum(
        np.minimum(np.abs(ys - 11.5), np.abs(ys - 35.5)), np.minimum(np.abs(xs - 11.5), np.abs(xs - 35.5))
    )
    assert on_outline.max() <= 0.5
    assert not edges[16:32, 16:32].any() and not edges[:8].any()  # nothing inside, nothing far outside
    # each side is one pixel wide: about the outline's length, not twice it
    assert 4 * 22 <= edges.sum() <= 4 * 26


def test_flat_image_has_no_edges():
    assert not canny(np.full((32, 32), 128.0, np.float32)).any()


def test_hysteresis_keeps_weak_edges_only_where_they_touch_strong_ones():
    weak_alone = _square(30.0)  # |gx| + |gy| = 120 at the step: between the thresholds 100 and 200
    assert not canny(weak_alone).any()
    joined = weak_alone.copy()
    joined[12:36, 12:24] = 255.0  # the left half steps strongly; the weak right half's outline touches it
    edges = canny(joined)
    assert edges[11:13, 30:34].any() or edges[35:37, 30:34].any()  # weak outline kept, reached from the strong part
    assert canny(weak_alone, 50, 100).any()  # lower thresholds keep the weak square on its own


def test_canny_image_is_an_rgb_map_of_the_input_size():
    picture = Image.fromarray(np.stack([_square(200.0, 40, 8, 30).astype(np.uint8)] * 3, -1)).resize((56, 40))
    out = canny_image(picture)
    assert out.mode == "RGB" and out.size == (56, 40)
    values = np.unique(np.asarray(out))
    assert set(values.tolist()) <= {0, 255} and 255 in values
