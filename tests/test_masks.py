"""The mask maths without a model: regions, their vote, the blend weights, the paste, and the step guide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim_worker.core import masks as M
from ddim_worker.core.regions import colour_clusters, components, image_regions, otsu_threshold
from ddim_worker.core.trajectory_guides import TrajectoryGuide, guide_step


def _scene() -> np.ndarray:
    """A red disc on gray, 64 x 64, and its mask."""
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    disc = (xx - 24) ** 2 + (yy - 36) ** 2 <= 12 ** 2
    image = np.where(disc[..., None], np.array([220, 30, 30], np.uint8), np.array([128, 128, 128], np.uint8))
    return image.astype(np.uint8), disc


def test_components_split_one_colour_into_its_connected_areas():
    labels = torch.tensor([[0, 0, 1, 0],
                           [1, 1, 1, 0],
                           [0, 0, 1, 0]])
    assert components(labels).tolist() == [[0, 0, 2, 3],
                                           [2, 2, 2, 3],
                                           [8, 8, 2, 3]]  # no wrap-around between the first and last column


def test_otsu_splits_weighted_values_where_the_classes_separate():
    values, weights = torch.tensor([1.0, 1.1, 3.0, 3.2]), torch.tensor([10.0, 10.0, 1.0, 1.0])
    assert otsu_threshold(values, weights) == pytest.approx(2.05)
    assert otsu_threshold(torch.tensor([2.0]), torch.tensor([5.0])) < 2.0  # one region: everything is changed


def test_an_images_regions_follow_its_colours():
    image, disc = _scene()
    regions = image_regions(torch.from_numpy(image))
    assert len(torch.unique(regions)) == 2
    assert len(torch.unique(regions[torch.from_numpy(disc)])) == 1
    assert colour_clusters(torch.from_numpy(image)).shape == (64, 64)


def test_regions_vote_with_their_mean_change_so_the_mask_has_the_images_edges():
    """A blurry change map, higher on average over the background but with a hot spot on the disc's edge (as a
    small model's is): the mask is the whole background, to the pixel."""
    image, disc = _scene()
    latent = torch.full((8, 8), 1.0)
    latent[3:6, 1:5] = 0.3  # the disc's cells
    latent[2, 3] = 2.5  # an edge cell, hotter than anything
    pixel = np.where(disc, 40.0, 100.0).astype(np.float32)
    mask = M.region_mask(latent, pixel, image)
    assert np.array_equal(mask, ~disc)
    weights = M.latent_mask(mask, (8, 8))
    assert weights.shape == (1, 8, 8) and float(weights.max()) == 1.0 and 0 < float(weights[0, 3, 2]) < 1
    edited = np.zeros_like(image)
    pasted = M.paste_back(edited, image, mask)
    # the input where the mask keeps it, but its outline band (PASTE_MARGIN px) and the masked region from the edit
    kept = ~M.grow(mask, M.PASTE_MARGIN)
    assert kept.sum() < disc.sum() and np.array_equal(pasted[kept], image[kept]) and not pasted[~kept].any()
    assert not pasted[disc & ~kept].any()  # the disc's outside ring of pixels: the edit's
    assert M.mask_image(mask).dtype == np.uint8 and set(np.unique(M.mask_image(mask))) == {0, 255}


def test_noisings_are_fixed_per_level_and_not_per_row():
    levels = M.noisings(tuple(range(981, 0, -20)))
    assert len(levels) == M.DRAWS and len({seed for _, seed in levels}) == M.DRAWS
    assert [981 - 20 * level for level, _ in levels] == [801] * 2 + [901] * 2
    assert torch.equal(M.draw_noise((4, 8, 8), 7), M.draw_noise((4, 8, 8), 7))
    assert M.sampling_start(20) == 15 and M.sampling_start(0) == 0


def test_the_guide_pins_sources_adds_their_correction_and_blends_outside_masks():
    x = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 1, 2, 2)  # four branches after a step
    target = -x  # the trajectory at the same level
    mask = torch.tensor([[[1.0, 0.0], [0.5, 1.0]]])
    out = guide_step(x, target, pinned=(0,), corrected=((1, 0),), masks={3: mask})
    assert torch.equal(out[0], target[0])  # the source is put back on the trajectory
    assert torch.equal(out[1], x[1] + target[0] - x[0])  # its edit gains the same correction
    assert torch.equal(out[2], x[2])  # a branch with nothing to hold
    assert torch.equal(out[3], mask * x[3] + (1 - mask) * target[3])
    levels = torch.stack([x * 0, x * 0 + 1, x * 0 + 2])  # levels s, s + 1, s + 2
    guide = TrajectoryGuide(levels, start_level=5, masks={0: torch.zeros(1, 2, 2)}, blend_steps=1)
    assert torch.equal(guide({"x": x, "i": 5})[0], levels[1][0])  # the first step is blended
    assert torch.equal(guide({"x": x, "i": 6})[0], x[0])  # the second is not
