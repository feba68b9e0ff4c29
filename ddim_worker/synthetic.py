"""Deterministic synthetic test pictures: colour gradients with a disc and diagonal stripes, distinct per seed.

One generator for the benchmark (``ddim_worker.bench``), the inversion-quality table (``jobs/quality.py``) and the
tests (``tests/jobkit.py``): smooth images with edges, so a VAE and a UNet see structure, made without any file.

    picture_array(seed, size)          -> uint8 (size, size, 3)
    pictures(count, size, seed=0)      -> ``count`` distinct arrays (seeds ``seed * 1000 + i``)
    picture_bytes(seed, size, "PNG")   -> the array encoded by Pillow (PNG, JPEG, WEBP, ...)
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def picture_array(seed: int, size: int = 64) -> np.ndarray:
    """One picture, a function of ``seed`` and ``size`` only: RGB uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    c = rng.uniform(0.2, 1.0, (3, 3))
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r)[..., None]
    stripes = (np.sin((xx + yy) * rng.uniform(8, 24)) > 0)[..., None]
    base = np.stack([xx * c[0, 0] + yy * c[0, 1], yy * c[1, 0], (1 - xx * yy) * c[2, 2]], -1)
    pixels = np.where(disc, c[1], base) * np.where(stripes, 1.0, 0.85)
    return (np.clip(pixels, 0, 1) * 255).astype(np.uint8)


def pictures(count: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """``count`` distinct pictures; the same ``seed`` gives the same list (picture ``i`` uses ``seed * 1000 + i``)."""
    return [picture_array(seed * 1000 + i, size) for i in range(count)]


def picture_bytes(seed: int, size: int = 64, fmt: str = "PNG", **save_options) -> bytes:
    """``picture_array(seed, size)`` encoded as ``fmt`` (any format Pillow writes; ``save_options`` go to it)."""
    buffer = io.BytesIO()
    Image.fromarray(picture_array(seed, size)).save(buffer, fmt, **save_options)
    return buffer.getvalue()
