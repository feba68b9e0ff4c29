"""The shapes benchmark's three kinds of edit, and how each is judged from pixels with the scene's known mask.

- **colour**: only the shape's colour changes. Success: the shape's pixels have the new colour; background PSNR
  (pixels more than 2 px from the shape) and shape IoU (pixels unlike the background vs the scene's mask) say what
  was kept; the share of the outline band still in the old colour says whether a fringe was left, and the area
  ratio (largest area unlike the background, over the input's shape) whether the shape shrank or grew.
- **shape**: only the shape changes (circle, square, triangle). Success: the largest area of pixels unlike the
  background has the new shape (``shape_class``: the best-overlapping template in its bounding box); background PSNR
  away from both the old and the new outline; the shape's colour kept; that area's centroid shift (px) and area
  ratio (edited / input) say whether it moved or was resized (specks elsewhere count in the background PSNR).
- **background**: only the background colour changes. Success: the background (pixels more than 3 px from the
  shape) has the new colour; the shape's colour kept, shape PSNR (pixels well inside the shape, edited vs input) and
  shape IoU (against the new background) say what was kept; flatness: PSNR of the background against the flat
  target colour (textured or noisy backgrounds score low); the kept shape's area ratio (pixels unlike the new
  background, largest area, over the input's) and the share of the ring 2-4 px outside the shape that took the new
  background say whether the shape grew or left a halo.

Everything here is pure NumPy over the scene's description: no model.
"""

from __future__ import annotations

import math

import numpy as np

from ddim_worker.shapes import scenes as S

KINDS = ("colour", "shape", "background")


def edits(kind: str, scenes: list[S.Scene], seed: int) -> list[S.Scene]:
    """The target scene of each scene: another palette colour, shape or background, drawn with ``seed``."""
    rng = np.random.default_rng(seed + 1 + KINDS.index(kind))
    options = {"colour": list(S.COLOURS), "shape": list(S.SHAPES), "background": list(S.BACKGROUNDS)}[kind]
    field = {"colour": "colour", "shape": "shape", "background": "background"}[kind]
    targets = []
    for sc in scenes:
        others = [o for o in options if o != getattr(sc, field)]
        targets.append(sc.with_(**{field: others[rng.integers(len(others))]}))
    return targets


def largest_blob(seg: np.ndarray) -> np.ndarray:
    """The largest 4-connected area of ``seg`` (the shape; specks elsewhere dropped)."""
    import torch

    from ddim_worker.core.regions import components

    ids = components(torch.from_numpy(seg.astype(np.int64))).numpy()
    if not seg.any():
        return seg
    values, counts = np.unique(ids[seg], return_counts=True)
    return ids == values[counts.argmax()]


def area_ratio(shape: np.ndarray, m: np.ndarray) -> float:
    """The largest area of ``shape`` (pixels unlike the background) over the input shape's ``m``: did it grow or
    shrink."""
    return float(largest_blob(shape).sum() / max(1, m.sum()))


def _bbox_templates(seg: np.ndarray) -> dict[str, np.ndarray] | None:
    """Each shape class drawn in the bounding box of ``seg``'s largest area (after an opening that drops thin
    lines): the inscribed ellipse, the box, the upward triangle with its apex at the top centre."""
    opened = largest_blob(S._dilate(S._erode(seg, 1), 1))
    ys, xs = np.nonzero(opened if opened.sum() >= 8 else seg)
    if len(ys) < 8:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1  # pixel i covers [i, i + 1]
    yy, xx = np.mgrid[0:seg.shape[0], 0:seg.shape[1]] + 0.5  # pixel centres
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    box = (xx >= x0) & (xx <= x1) & (yy >= y0) & (yy <= y1)
    ellipse = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
    half_width = rx * (yy - y0) / (y1 - y0)  # the triangle widens linearly from the apex down to the base
    triangle = box & (np.abs(xx - cx) <= half_width)
    return {"circle": ellipse, "square": box, "triangle": triangle}


def shape_class(image: np.ndarray, background: str) -> str | None:
    """The shape of the pixels unlike ``background``: the template (in their bounding box) they overlap best."""
    seg = S.segment(image, background)
    templates = _bbox_templates(seg)
    seg = largest_blob(seg)
    if templates is None:
        return None
    iou = {name: (seg & t).sum() / max(1, (seg | t).sum()) for name, t in templates.items()}
    return max(iou, key=iou.get)


def _centroid(m: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(m)
    return (float(xs.mean()), float(ys.mean())) if len(xs) else (math.nan, math.nan)


def judge(kind: str, image: np.ndarray, source: np.ndarray, scene: S.Scene, target: S.Scene) -> dict:
    """One edited image (uint8 (64, 64, 3)) against its input ``source``, the input's scene and the target scene."""
    m = S.mask(scene)
    if kind == "colour":
        seg = S.segment(image, scene.background)
        return {"success": S.shape_colour(image, m) == target.colour, "bg_psnr": S.psnr(image, source,
                                                                                         ~S._dilate(m, 2)),
                "iou": float((seg & m).sum() / max(1, (seg | m).sum())),
                "edge_old_colour": edge_old_colour(image, m, scene),
                "area_ratio": area_ratio(seg, m)}  # did it shrink inside its mask
    if kind == "shape":
        seg = largest_blob(S.segment(image, scene.background))  # the shape, without specks elsewhere
        away = ~S._dilate(m | S.mask(target), 2)
        (x, y), (x0, y0) = _centroid(seg), _centroid(m)
        inner = S._erode(seg, 2) if S._erode(seg, 2).sum() >= 4 else seg
        colour = S.nearest(np.median(image[inner].astype(np.float32), 0), S.COLOURS) if inner.any() else None
        return {"success": shape_class(image, scene.background) == target.shape,
                "bg_psnr": S.psnr(image, source, away), "colour_kept": colour == scene.colour,
                "centroid_shift": float(math.hypot(x - x0, y - y0)) if seg.any() else math.nan,
                "area_ratio": area_ratio(seg, m)}
    if kind == "background":
        seg = S.segment(image, target.background)
        outer = ~S._dilate(m, 3)
        flat = np.broadcast_to(np.array(S.BACKGROUNDS[target.background], np.uint8), image.shape)
        return {"success": S.background_colour(image, m) == target.background,
                "colour_kept": S.shape_colour(image, m) == scene.colour,
                "shape_psnr": S.psnr(image, source, S._erode(m, 2) if S._erode(m, 2).any() else m),
                "iou": float((seg & m).sum() / max(1, (seg | m).sum())),
                "flatness": S.psnr(image, flat, outer),
                "area_ratio": area_ratio(seg, m),
                "ring_new_background": ring_new_background(image, m, target)}
    raise ValueError(f"edit kind must be one of {', '.join(KINDS)}, got {kind!r}")


def ring_new_background(image: np.ndarray, m: np.ndarray, target: S.Scene) -> float:
    """Background edits: the share of the ring 2-4 px outside the shape that takes the new background (a grown
    shape or a halo at the outline lowers it)."""
    ring = S._dilate(m, 4) & ~S._dilate(m, 1)
    return float((~S.segment(image, target.background))[ring].mean()) if ring.any() else math.nan


def edge_old_colour(image: np.ndarray, m: np.ndarray, scene: S.Scene) -> float:
    """Colour edits: the share of the outline band (1 px either side of the shape's edge) whose nearest palette
    colour (shape colours and the background) is still the shape's old colour: a fringe left by the edit."""
    band = S._dilate(m, 1) & ~S._erode(m, 1)
    palette = {**S.COLOURS, "background": S.BACKGROUNDS[scene.background]}
    old = [S.nearest(px, palette) == scene.colour for px in image[band].astype(np.float32)]
    return float(np.mean(old)) if old else math.nan


def changed_region(kind: str, scene: S.Scene, target: S.Scene) -> np.ndarray:
    """(64, 64) bool: the pixels the edit should change (a mask's truth): the shape (colour), the background
    (background), the old and the new outline (shape)."""
    if kind == "colour":
        return S.mask(scene)
    if kind == "background":
        return ~S.mask(scene)
    return S.mask(scene) | S.mask(target)


def mask_iou(kind: str, mask: np.ndarray, scene: S.Scene, target: S.Scene) -> float:
    """IoU of a mask (nonzero: changed) with the region the edit should change."""
    truth, mask = changed_region(kind, scene, target), np.asarray(mask) > 0
    return float((mask & truth).sum() / max(1, (mask | truth).sum()))


#: How each figure is summarised over scenes: mean, except shifts and ratios (medians: a few failed edits dominate a
#: mean of pixel distances).
MEDIANS = ("centroid_shift", "area_ratio")


def summarise(judged: list[dict]) -> dict[str, float]:
    out = {}
    for name in judged[0]:
        values = np.array([float(j[name]) for j in judged], dtype=np.float64)
        values = values[~np.isnan(values)]
        out[name] = float(np.median(values) if name in MEDIANS else np.mean(values)) if len(values) else math.nan
    return out
