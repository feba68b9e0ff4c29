"""Shapes scenes: 64 x 64 RGB, one shape of one colour on a plain background, its caption and its mask.

Caption: ``a {colour} {shape} on a {background} background``. The palette is fixed (issue 11). Scenes are drawn by
several rasterisers (PIL at 1x, PIL supersampled, numpy analytic coverage) so that a model trained on them does not
depend on one way of drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 30),
    "green": (30, 170, 40),
    "blue": (30, 70, 230),
    "purple": (140, 40, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
RENDERERS = ("pil", "pil-ss2", "pil-ss4", "analytic")
#: The words of every caption: the tokenizer has them as whole tokens.
WORDS = ("a", "on", "background", *COLOURS, *SHAPES, *BACKGROUNDS)


def caption(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background":
        raise ValueError(f"not a shapes caption: {text!r}")
    return words[1], words[2], words[5]


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    cx: float  # centre, pixels (pixel centres at i + 0.5)
    cy: float
    r: float  # radius: circle radius, square half-side, triangle circumradius
    renderer: str = "analytic"
    variant: int = 0  # triangle: 0 equilateral (circumradius r), 1 isosceles in the box of half-side r

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)

    def with_(self, **changes) -> Scene:
        return replace(self, **changes)


def triangle_points(cx: float, cy: float, r: float, variant: int = 0) -> list[tuple[float, float]]:
    """An upward-pointing triangle: apex at the top, base at the bottom (0: equilateral of circumradius r; 1: the
    isosceles triangle in the square of half-side r)."""
    if variant == 1:
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    s = math.sqrt(3) / 2
    return [(cx, cy - r), (cx + r * s, cy + r / 2), (cx - r * s, cy + r / 2)]


def random_scene(rng: np.random.Generator, renderer: str | None = None, r_range=(9.0, 23.0)) -> Scene:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    r = float(rng.uniform(*r_range))
    margin = r + 1.0
    cx = float(rng.uniform(margin, SIZE - margin))
    cy = float(rng.uniform(margin, SIZE - margin))
    if renderer is None:
        renderer = RENDERERS[rng.integers(len(RENDERERS))]
    return Scene(colour, shape, background, cx, cy, r, renderer, int(rng.integers(2)))


def _coverage_pil(scene: Scene, scale: int) -> np.ndarray:
    """Coverage in [0, 1] (H, W) drawn by PIL at ``scale`` x and box-downsampled."""
    n = SIZE * scale
    img = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(img)
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.r * scale
    if scene.shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif scene.shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        d.polygon(triangle_points(cx, cy, r, scene.variant), fill=255)
    if scale > 1:
        img = img.resize((SIZE, SIZE), Image.BOX)
    return np.asarray(img, dtype=np.float32) / 255.0


def _coverage_analytic(scene: Scene, ss: int = 4) -> np.ndarray:
    """Exact-ish area coverage by ``ss`` x ``ss`` supersampling of the pixel square."""
    offs = (np.arange(ss) + 0.5) / ss
    ys = (np.arange(SIZE)[:, None] + offs[None, :]).reshape(-1)
    xs = ys
    X, Y = np.meshgrid(xs, ys)
    cx, cy, r = scene.cx, scene.cy, scene.r
    if scene.shape == "circle":
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
    elif scene.shape == "square":
        inside = (np.abs(X - cx) <= r) & (np.abs(Y - cy) <= r)
    else:
        (ax, ay), (bx, by), (qx, qy) = triangle_points(cx, cy, r, scene.variant)
        def side(px, py, ex, ey, fx, fy):
            return (fx - ex) * (py - ey) - (fy - ey) * (px - ex)
        s1, s2, s3 = side(X, Y, ax, ay, bx, by), side(X, Y, bx, by, qx, qy), side(X, Y, qx, qy, ax, ay)
        inside = ((s1 >= 0) & (s2 >= 0) & (s3 >= 0)) | ((s1 <= 0) & (s2 <= 0) & (s3 <= 0))
    return inside.reshape(SIZE, ss, SIZE, ss).mean(axis=(1, 3)).astype(np.float32)


def coverage(scene: Scene) -> np.ndarray:
    if scene.renderer == "pil":
        return _coverage_pil(scene, 1)
    if scene.renderer.startswith("pil-ss"):
        return _coverage_pil(scene, int(scene.renderer[6:]))
    if scene.renderer == "analytic":
        return _coverage_analytic(scene)
    raise ValueError(f"unknown renderer {scene.renderer!r}")


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8."""
    a = coverage(scene)[..., None]
    fg = np.array(COLOURS[scene.colour], np.float32)
    bg = np.array(BACKGROUNDS[scene.background], np.float32)
    return np.clip(np.round(a * fg + (1 - a) * bg), 0, 255).astype(np.uint8)


def mask(scene: Scene) -> np.ndarray:
    """(64, 64) bool: pixels at least half covered by the shape (analytic coverage)."""
    return _coverage_analytic(scene.with_(renderer="analytic")) >= 0.5


def dataset(n: int, seed: int) -> tuple[np.ndarray, list[Scene]]:
    """``n`` random scenes (uint8 (n, 64, 64, 3)) and their descriptions, seeded."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), scenes


# -- judging images from pixels ------------------------------------------------------------------------------------
def nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = [float(np.sum((np.asarray(rgb, np.float32) - np.array(palette[k], np.float32)) ** 2)) for k in names]
    return names[int(np.argmin(d))]


def shape_colour(image: np.ndarray, m: np.ndarray) -> str:
    """The palette colour nearest the median of the pixels well inside mask ``m``."""
    inner = _erode(m, 2)
    if inner.sum() < 4:
        inner = m
    return nearest(np.median(image[inner].astype(np.float32), axis=0), COLOURS)


def background_colour(image: np.ndarray, m: np.ndarray) -> str:
    outer = ~_dilate(m, 3)
    return nearest(np.median(image[outer].astype(np.float32), axis=0), BACKGROUNDS)


def _erode(m: np.ndarray, k: int) -> np.ndarray:
    return ~_dilate(~m, k)


def _dilate(m: np.ndarray, k: int) -> np.ndarray:
    from ddim_worker.core.masks import grow

    return grow(m, k)


def segment(image: np.ndarray, background: str, thresh: float = 60.0) -> np.ndarray:
    """Pixels that differ from the ``background`` colour by more than ``thresh`` (Euclidean RGB): the shape."""
    bg = np.array(BACKGROUNDS[background], np.float32)
    return np.linalg.norm(image.astype(np.float32) - bg, axis=-1) > thresh


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d[where].mean()) if where is not None else float(d.mean())
    return 99.0 if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)
