"""Where an edit changes the image, from the prompts and the image itself: pure tensor maths (``mask auto``).

1. **The prompts' signal** (DiffEdit, Couairon et al. 2022; diffusers' ``StableDiffusionDiffEditPipeline.
   generate_mask``): what the UNet predicts under the edit prompt differs from what it predicts under the source
   prompt where the edit has something to change. The engine noises the image's latent ``DRAWS`` times (seeded) at
   ``NOISE_STRENGTH`` and predicts each under both prompts; two maps are read and averaged over the draws: the
   noise predictions' difference per latent cell (DiffEdit's), and the difference of the two predicted clean images
   after decoding, per pixel. A VAE whose latents carry their neighbours' context (the shapes model's does) moves a
   kept region's latents too when its surroundings change, so the latent map alone points at the wrong region in
   about one background edit in ten; the decoded images do not. Each map is divided by its mean and they are added.
2. **The image's regions vote** (``regions``): the map is blurry and, in a small model, strong along edges and weak
   in the middle of a large changed area; each connected area of one colour takes its mean, and a weighted
   two-class split (Otsu) of those means says which regions change. The mask follows the image's own edges.
3. **Keeping the rest**: while sampling, the latents outside the mask (its coverage of each latent cell) are blended
   back to the inverted trajectory at every step of the first ``BLEND_FRACTION`` of the sampled steps
   (``trajectory_guides``), so the edit takes shape around the kept layout; after decoding, the pixels outside the
   mask, less a 1 px band along its edge, are the input's (:func:`paste_back`: an anti-aliased outline is a region
   of its own, and pasted from the input it left a fringe of the old colour around recoloured shapes). Blending to the end fights the edit in a VAE whose latents carry their
   neighbours' context (the shapes model's): kept latents say "red circle on white" and the freed region stays red
   (colour edits succeeded in 0.71 of scenes with blending at every step, 0.96 with it for the first half), and
   the same VAE would redraw the kept region in its new surroundings without the paste. Since the rest is kept,
   sampling starts a quarter of the start step deeper (``settings.sampling_start``), so the region the mask frees is
   regenerated more.

Limits: a mask is a union of the input's regions, so an edit that moves an outline (a circle becoming a square) is
cut to the old outline, and an edit of the whole image (a style) is split in two. Figures: docs/quality.md.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ddim_worker.core.regions import image_regions, otsu_threshold
# The level a masked edit samples from (start step 20 of 50: level 15) is a rule of the settings: the CPU stages that
# pack rows into calls read it without loading torch. Re-exported here, beside the rest of the method.
from ddim_worker.core.settings import START_FRACTION, sampling_start  # noqa: F401

#: Noise levels of the noisings, as fractions of the training timesteps (DiffEdit uses 0.5 on SD 1.x), and seeded
#: noisings at each (DiffEdit: 10 at one level). On the shapes model a background edit's signal sits on the background
#: only from about 0.8 (with the latent map alone, the regions' vote went wrong on 25 of 96 background edits at 0.5,
#: 11 at 0.8).
NOISE_STRENGTHS = (0.8, 0.9)
DRAWS_PER_STRENGTH = 2
DRAWS = len(NOISE_STRENGTHS) * DRAWS_PER_STRENGTH
#: The noisings do not depend on a row's seed, so every edit of an image shares its source-prompt predictions.
SEED = 20221020


#: The latents outside the mask are blended back for this fraction of the sampled steps (the first ones).
BLEND_FRACTION = 0.5


def noisings(timesteps: tuple[int, ...], num_train_timesteps: int = 1000) -> list[tuple[int, int]]:
    """(schedule level, seed) of each noising: the level whose timestep is nearest each strength."""
    out = []
    for k, strength in enumerate(NOISE_STRENGTHS):
        level = min(range(len(timesteps)), key=lambda i: abs(timesteps[i] - strength * num_train_timesteps))
        out += [(level, SEED + k * DRAWS_PER_STRENGTH + d) for d in range(DRAWS_PER_STRENGTH)]
    return out


def draw_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """One noising of a latent of ``shape`` (C, h, w): the same for every image."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def change_map(eps_edit: torch.Tensor, eps_source: torch.Tensor) -> torch.Tensor:
    """(B, h, w): ``|eps_edit - eps_source|`` averaged over the latent channels (the same latents, two prompts)."""
    return (eps_edit.float() - eps_source.float()).abs().mean(dim=1)


def pixel_change(image_edit: np.ndarray, image_source: np.ndarray) -> np.ndarray:
    """(B, H, W): the RGB distance between the decoded predictions under the two prompts (uint8 (B, H, W, 3))."""
    return np.linalg.norm(image_edit.astype(np.float32) - image_source.astype(np.float32), axis=-1)


def region_mask(latent: torch.Tensor, pixel: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(H, W) bool: the regions of ``pixels`` (uint8 (H, W, 3)) whose mean change is in the upper class of the
    area-weighted two-class split. The change is ``latent`` ((h, w), upsampled) and ``pixel`` ((H, W)), each over
    its mean."""
    height, width = pixels.shape[:2]
    latent = F.interpolate(latent[None, None].float().cpu(), size=(height, width), mode="nearest")[0, 0].double()
    pixel_map = torch.from_numpy(pixel).double()
    change = latent / latent.mean().clamp(min=1e-12) + pixel_map / pixel_map.mean().clamp(min=1e-12)
    regions = image_regions(torch.from_numpy(np.ascontiguousarray(pixels)))
    _, inverse, areas = torch.unique(regions.flatten(), return_inverse=True, return_counts=True)
    means = torch.zeros(len(areas), dtype=torch.float64).index_add_(0, inverse, change.flatten()) / areas
    changed = means > otsu_threshold(means, areas.double())
    return changed[inverse].view(height, width).numpy()


def latent_mask(mask: np.ndarray, latent_size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) float in [0, 1]: how much of each latent cell's pixels the mask covers (the blend weight)."""
    pixels = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.adaptive_avg_pool2d(pixels, latent_size)[0]


#: The paste takes this many pixels outside the mask from the edit too: the mask is a union of the input's regions,
#: and an anti-aliased outline is a region of blended colours of its own; pasted from the input it leaves a fringe of
#: the old colour around a recoloured shape.
PASTE_MARGIN = 1


def paste_back(edited: np.ndarray, source: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The edited image inside the mask (and ``PASTE_MARGIN`` pixels around it), the input elsewhere; uint8 (H, W, 3)."""
    return np.where(grow(mask, PASTE_MARGIN)[..., None], edited, source)


def grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` (4-neighbour steps)."""
    out = np.asarray(mask, bool)
    for _ in range(pixels):
        p = np.pad(out, 1)
        out = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]
    return out


def mask_image(mask: np.ndarray) -> np.ndarray:
    """The mask as an image: uint8 (H, W), 255 where the edit changes the image."""
    return mask.astype(np.uint8) * 255
