"""Per-step corrections that hold sampled latents to an inverted trajectory: pure tensor maths, run by the sampler's
step callback after every DDIM step of a call.

- **direct inversion** (Ju et al. 2023, "PnP Inversion"): a source branch is put back on its stored trajectory at
  every level, so it reconstructs the image exactly; the difference that took (the trajectory's latent minus where
  plain DDIM sampling went) is also added to the edit branches that read that source, so what the edit does not
  change follows the trajectory too;
- **local blending**: outside a row's mask its latent is set back to the trajectory's at the same level; inside, the
  edit goes on (the blend is soft where the mask is). It runs for the first ``blend_steps`` sampled steps.

Levels are the sampler's: step i moves from level i to level i + 1 (level n is x0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class TrajectoryGuide:
    """What one sampling call holds to the trajectory; call it as the sampler's ``callback``."""

    levels: torch.Tensor  # (n - s + 1, B, C, h, w): each branch's stored latent at levels s .. n
    start_level: int  # s
    pinned: tuple[int, ...] = ()  # branches set to the trajectory at every step (direct inversion's sources)
    corrected: tuple[tuple[int, int], ...] = ()  # (edit branch, its source branch): the source's correction added
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # branch -> (1, h, w) in [0, 1]; 1: edited
    blend_steps: int = 0  # the masks hold for the first this many sampled steps

    @property
    def active(self) -> bool:
        return bool(self.pinned or self.corrected or self.masks)

    def __call__(self, info: dict[str, Any]) -> torch.Tensor:
        x = info["x"]  # (B, C, h, w) at level i + 1, just stepped to
        step = info["i"] - self.start_level  # 0: the first sampled step
        target = self.levels[step + 1].to(x)
        return guide_step(x, target, self.pinned, self.corrected, self.masks if step < self.blend_steps else {})


def guide_step(x: torch.Tensor, target: torch.Tensor, pinned: tuple[int, ...],
               corrected: tuple[tuple[int, int], ...], masks: dict[int, torch.Tensor]) -> torch.Tensor:
    """``x`` after one step, held to ``target`` (the trajectory at the same level, branch by branch).

    1. Each corrected edit branch gains its source's correction ``target[src] - x[src]``.
    2. Each pinned branch becomes ``target`` (its correction is exactly that difference).
    3. Each masked branch keeps its own latent where its mask is 1 and takes ``target`` where it is 0.
    """
    out = x.clone()
    for edit, source in corrected:
        out[edit] = x[edit] + (target[source] - x[source])
    for branch in pinned:
        out[branch] = target[branch]
    for branch, mask in masks.items():
        mask = mask.to(out)
        out[branch] = mask * out[branch] + (1 - mask) * target[branch]
    return out
