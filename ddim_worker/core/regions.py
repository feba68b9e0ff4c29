"""An image's regions from its own pixels: connected areas of similar colour. Pure tensor maths, no model.

Used to turn a blurry "where does the edit change the prediction" map into a mask with the image's own edges
(``masks``): each region votes with its mean, so a region changes or stays as a whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Colour clusters per image, and the longest side regions are found at (larger images are area-downsampled first,
#: then their labels upsampled): enough for the regions an edit speaks of, bounded work at 512 px.
COLOURS = 4
MAX_SIDE = 128


def colour_clusters(pixels: torch.Tensor, k: int = COLOURS, iterations: int = 10) -> torch.Tensor:
    """k-means of the pixels' RGB, (H, W, 3) uint8 or float -> (H, W) long cluster labels. Deterministic: the
    centres start at the colour quantiles of the pixels' brightness."""
    colours = pixels.reshape(-1, 3).float()
    order = colours.sum(dim=1).argsort()
    centres = colours[order[((torch.arange(k) + 0.5) * len(order) / k).long()]].clone()
    for _ in range(iterations):
        labels = torch.cdist(colours, centres).argmin(dim=1)
        for j in range(k):
            members = colours[labels == j]
            if len(members):
                centres[j] = members.mean(dim=0)
    return torch.cdist(colours, centres).argmin(dim=1).view(pixels.shape[:2])


def components(labels: torch.Tensor) -> torch.Tensor:
    """(H, W) labels -> (H, W) ids of their 4-connected components (each id the smallest pixel index in it), by
    min-label propagation."""
    height, width = labels.shape
    ids = torch.arange(height * width).view(height, width)
    none = height * width
    while True:
        smallest = ids.clone()
        for shift, dim in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
            neighbour_ids = torch.roll(ids, shift, dim)
            same = torch.roll(labels, shift, dim) == labels
            # no wrap-around: the rolled-in edge row (or column) is not a neighbour
            edge = [slice(None), slice(None)]
            edge[dim] = 0 if shift == 1 else -1
            same[tuple(edge)] = False
            smallest = torch.minimum(smallest, torch.where(same, neighbour_ids, torch.full_like(ids, none)))
        if torch.equal(smallest, ids):
            return ids
        ids = smallest


def image_regions(pixels: torch.Tensor, max_side: int = MAX_SIDE) -> torch.Tensor:
    """(H, W, 3) image -> (H, W) region ids: connected areas of one colour cluster, found at ``max_side`` px at most."""
    height, width = pixels.shape[:2]
    scale = max(height, width) / max_side
    small = pixels.float()
    if scale > 1:
        size = (max(1, round(height / scale)), max(1, round(width / scale)))
        small = F.interpolate(small.permute(2, 0, 1)[None], size=size, mode="area")[0].permute(1, 2, 0)
    ids = components(colour_clusters(small))
    if scale > 1:
        ids = F.interpolate(ids[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
    return ids


def otsu_threshold(values: torch.Tensor, weights: torch.Tensor) -> float:
    """The weighted two-class split of ``values`` (Otsu): the threshold that maximises the between-class variance.
    Below the smallest value when there is one value only."""
    order = values.argsort()
    v, w = values[order].double(), weights[order].double()
    if len(v) < 2:
        return float(v[0]) - 1.0 if len(v) else 0.0
    cw, cwv = w.cumsum(0), (w * v).cumsum(0)
    w0, w1 = cw[:-1], cw[-1] - cw[:-1]
    m0, m1 = cwv[:-1] / w0, (cwv[-1] - cwv[:-1]) / w1
    k = int((w0 * w1 * (m0 - m1) ** 2).argmax())
    return float((v[k] + v[k + 1]) / 2)
