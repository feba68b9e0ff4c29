"""Steps 4 and 6 of a group's edit: run every sampling call of the plan as its ``CallStep`` says (branches,
prompts, unconditional embeddings, attention control, trajectory guide, riders), and resample the inversions to
measure their fidelity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ddim_worker.core import loops, sampler
from ddim_worker.core import masks as M
from ddim_worker.core.attention_control import CallControl, replaced_steps
from ddim_worker.core.edit_types import EditOutput
from ddim_worker.core.group_plan import CallStep
from ddim_worker.core.inversion_steps import share
from ddim_worker.core.trajectory_guides import TrajectoryGuide

if TYPE_CHECKING:
    from ddim_worker.core.group_state import GroupRun


def sample_plan(run: GroupRun, steps: Sequence[CallStep], uncond_steps: dict[int, torch.Tensor]) -> torch.Tensor:
    """Run every sampling call of the plan's ``steps``; x0 latents of the rows' edits, (len(rows), C, h, w).

    Each call: its branches' starting latents (the trajectories at tau[s]), the step's prompts, guidance, seeds,
    null-text embeddings and attention control, and the trajectory guide it holds; its riders invert alongside.
    """
    work, schedule, start_step = run.work, run.schedule, run.start_step
    target = schedule.label(start_step)
    x0: torch.Tensor | None = None
    for step in steps:
        branches = step.call.branches
        start = torch.cat([work[b.row].trajectory.at(target) for b in branches] or [torch.empty(0, 0)])
        start = start.to(run.model.device, torch.float32)
        null_text = {j: uncond_steps[row] for j, row in step.null_text}
        guide = _guide(run, step)
        args = (start, list(step.prompts), list(step.negative_prompts), list(step.guidance), schedule.num_steps,
                start_step, list(step.seeds), run.eta, null_text)
        callback = guide if guide.active else None
        if step.call.riders:
            out = _ride(run, step, *args, control=step.control, callback=callback)
            if not branches:
                continue
        else:
            out = loops.sample(run.model, *args, control=step.control, callback=callback, layout=step.call.shape)
        if x0 is None:
            x0 = torch.empty((len(run.rows), *out.shape[1:]), dtype=out.dtype, device=out.device)
        for j, b in enumerate(branches):
            if not b.is_source:
                x0[b.row] = out[j]
    assert x0 is not None, "a group has at least one row"
    return x0


def _ride(run: GroupRun, step: CallStep, x: torch.Tensor, prompts: list[str], negative_prompts: list[str],
          guidance: list[float], num_steps: int, start_step: int, seeds: list[int], eta: float,
          uncond_steps: dict[int, torch.Tensor], control: CallControl | None, callback) -> torch.Tensor:
    """The call's branches sampled with its riders inverting in the same UNet calls (``loops.sample_with_riders``);
    each rider's trajectory goes to the rows that wait on it."""
    work, model = run.work, run.model
    lead = list(step.call.riders)
    cond = model.conditioning(prompts + list(step.rider_prompts), negative_prompts + list(step.rider_negative_prompts),
                              guidance + list(step.rider_guidance), step.call.shape)
    z = torch.cat([work[i].x0 for i in lead]).to(model.device, torch.float32)
    x, new = loops.sample_with_riders(model, x, z, cond, num_steps, start_step, seeds, eta, uncond_steps, control,
                                      callback)
    for j, i in enumerate(lead):
        work[i].trajectory, work[i].x0 = new.rows([j]), None
        share(work, work[i].members)
    return x


def _guide(run: GroupRun, step: CallStep) -> TrajectoryGuide:
    """What the call holds to the stored trajectories (the step's pinned, corrected and masked branches)."""
    work, schedule, start_step = run.work, run.schedule, run.start_step
    branches = step.call.branches
    if not step.pinned and not step.masked:
        return TrajectoryGuide(torch.empty(0), start_step)
    masks = {j: work[branches[j].row].latent_mask.to(run.model.device) for j in step.masked}
    labels = [schedule.label(level) for level in range(start_step, schedule.num_steps + 1)]
    levels = torch.stack([torch.cat([work[b.row].trajectory.at(t) for b in branches]) for t in labels])
    blend_steps = replaced_steps(M.BLEND_FRACTION, run.sampled_steps)
    return TrajectoryGuide(levels.to(run.model.device, torch.float32), start_step, step.pinned, step.corrected, masks,
                           blend_steps)


def measure_fidelity(run: GroupRun, outputs: list[EditOutput], uncond_steps: dict[int, torch.Tensor]) -> None:
    """Resample each inversion with its *source* prompt (the plan's ``fidelity`` calls) and compare with the input:
    how faithful it was."""
    from ddim_worker.core.metrics import latent_mse, psnr, ssim

    x0_rec = sample_plan(run, run.plan.fidelity, uncond_steps)
    reconstructions = run.model.decode(x0_rec)
    inputs = run.model.input_pixels([r.image for r in run.rows])
    for i, out in enumerate(outputs):
        out.reconstruction = reconstructions[i]
        out.psnr = psnr(inputs[i], reconstructions[i])
        out.ssim = ssim(inputs[i], reconstructions[i])
        out.latent_mse = latent_mse(out.trajectory.at(sampler.CLEAN_TIMESTEP)[0], x0_rec[i].cpu())
        out.sampling_passes += run.sampled_steps
