"""Step 3 of a group's edit: the masks of the rows with mask auto (the maths: ``masks``), predicted through the
model adapter's one UNet call site."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from ddim_worker.core import masks as M
from ddim_worker.core import sampler
from ddim_worker.core import schedule as sch
from ddim_worker.core.model_adapter import Layout

if TYPE_CHECKING:
    from ddim_worker.core.group_state import GroupRun


def find_masks(run: GroupRun) -> None:
    """Masks for the rows with mask auto (``masks``): ``masks.DRAWS`` seeded noisings of the image's latent,
    predicted unguided under the edit prompt beside the source prompt (planned like sampling: one source branch
    per image, shared by its edits); the predictions' difference, in latents and decoded, then the image's
    regions vote. The calls are the plan's (``GroupPlan.mask_calls``)."""
    rows, work, model = run.rows, run.work, run.model
    index = run.plan.mask_rows
    if not index:
        return
    latent_change: dict[int, torch.Tensor] = {}
    pixel_change: dict[int, np.ndarray] = {}
    for call in run.plan.mask_calls:
        branches = [(index[b.row], b) for b in call.branches]
        for i, latent, pixel in _call_changes(run, branches, call.shape):
            latent_change[i] = latent_change[i] + latent if i in latent_change else latent
            pixel_change[i] = pixel_change[i] + pixel if i in pixel_change else pixel
    pixels = model.input_pixels([rows[i].image for i in index])
    for k, i in enumerate(index):
        work[i].input_pixels = pixels[k]
        work[i].mask = M.region_mask(latent_change[i], pixel_change[i], pixels[k])
        work[i].latent_mask = M.latent_mask(work[i].mask, tuple(latent_change[i].shape))


def _call_changes(run: GroupRun, branches: list, layout: Layout) -> list[tuple[int, torch.Tensor, np.ndarray]]:
    """One mask call's (row, latent change, pixel change) per edit branch and noising, each divided by the draws."""
    rows, work, model, schedule = run.rows, run.work, run.model, run.schedule
    noisings = M.noisings(schedule.timesteps, int(model.scheduler_config.get("num_train_timesteps", 1000)))
    x0 = torch.cat([work[i].trajectory.at(sampler.CLEAN_TIMESTEP) for i, _ in branches])
    x0 = x0.to(model.device, torch.float32)
    prompts = [rows[i].source_prompt if b.is_source else rows[i].edit_prompt for i, b in branches]
    cond = model.conditioning(prompts, [rows[i].negative_prompt for i, _ in branches], [1.0] * len(branches), layout)
    out = []
    for level, seed in noisings:
        t, alpha = schedule.timesteps[level], float(schedule.alphas[level])
        noisy = sch.add_noise(x0, M.draw_noise(tuple(x0.shape[1:]), seed).to(x0), alpha)
        with torch.inference_mode():
            eps = model.denoise(noisy, t, cond)
        decoded = model.decode(sch.pred_original_sample(noisy, eps, alpha))
        for j, (i, b) in enumerate(branches):
            if not b.is_source:
                source = b.source
                out.append((i, M.change_map(eps[j:j + 1], eps[source:source + 1])[0].cpu() / M.DRAWS,
                            M.pixel_change(decoded[j:j + 1], decoded[source:source + 1])[0] / M.DRAWS))
    return out
