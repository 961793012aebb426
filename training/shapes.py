"""The coloured-shapes domain of the shipped model: deterministic images and captions.

One anti-aliased shape on a plain background, 64x64 RGB, with a caption that says what is drawn:
`a [size] <colour> <shape> [at the <position>] on a <colour> background`. Used for training,
calibration and tests; deterministic by seed (numpy Generator + PIL drawing, no global state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (245, 140, 20),
    "purple": (140, 40, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.16, "large": 0.30}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
IMAGE_SIZE = 64
SUPERSAMPLE = 4  # drawn 4x larger then downsampled: anti-aliased edges
POSITION_JITTER = 0.03  # fraction of the side; keeps positions recognisable while varying pixels
SIZE_JITTER = 0.12  # relative radius jitter


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    size: str
    position: str
    say_size: bool = True  # whether the caption names the size
    say_position: bool = True  # whether the caption names the position

    @property
    def caption(self) -> str:
        size = f"{self.size} " if self.say_size else ""
        position = f" at the {self.position}" if self.say_position else ""
        return f"a {size}{self.colour} {self.shape}{position} on a {self.background} background"


def random_scene(rng: np.random.Generator, p_omit: float = 0.3) -> Scene:
    """A scene with every attribute drawn; size and position are left out of the caption with probability p_omit."""
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(
        colour=str(colour),
        background=str(background),
        shape=str(rng.choice(SHAPES)),
        size=str(rng.choice(list(SIZES))),
        position=str(rng.choice(list(POSITIONS))),
        say_size=bool(rng.random() >= p_omit),
        say_position=bool(rng.random() >= p_omit),
    )


def _star(cx, cy, r):
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else r * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    fx, fy = POSITIONS[scene.position]
    cx = (fx + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * big
    cy = (fy + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * big
    r = SIZES[scene.size] * big * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif scene.shape == "square":
        s = r * 0.88  # similar area to the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif scene.shape == "triangle":
        h = r * 1.1
        draw.polygon([(cx, cy - h), (cx - h * 0.95, cy + h * 0.7), (cx + h * 0.95, cy + h * 0.7)], fill=fill)
    else:
        draw.polygon(_star(cx, cy, r * 1.15), fill=fill)
    return img.resize((size, size), Image.LANCZOS)


def sample(seed: int, n: int, p_omit: float = 0.3) -> tuple[np.ndarray, list[Scene]]:
    """n images (uint8, NHWC) and their scenes, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, p_omit) for _ in range(n)]
    images = np.stack([np.asarray(render(s, rng)) for s in scenes])
    return images, scenes
