"""Steps 5 and 7 of a group's edit: run every sampling call of the plan (branches, prompts, unconditional
embeddings, attention control, trajectory guide, riders), and resample the inversions to measure their fidelity.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddim_worker import loops, sampler
from ddim_worker import masks as M
from ddim_worker.attention_control import CallControl, RowControl, replaced_steps, step_control
from ddim_worker.call_plan import RowNeeds, SamplingCall, plan_sampling
from ddim_worker.edit_types import EditOutput
from ddim_worker.inversion_steps import share
from ddim_worker.trajectory_guides import TrajectoryGuide

if TYPE_CHECKING:
    from ddim_worker.group_run import GroupRun


def sample_plan(run: GroupRun, plan: list[SamplingCall], controls: list[RowControl | None],
                uncond_steps: dict[int, torch.Tensor], use_source_prompt: bool = False) -> torch.Tensor:
    """Run every sampling call of ``plan``; x0 latents of the rows' edits, (len(rows), C, h, w).

    Each call: 1. its branches' starting latents (the trajectories at tau[s]); 2. their prompts (the source
    prompt on source branches); 3. the attention control and the trajectory guide of the call; 4. sample.
    """
    rows, work, schedule, start_step = run.rows, run.work, run.schedule, run.start_step
    target = schedule.label(start_step)
    x0: torch.Tensor | None = None
    for call in plan:
        branches = call.branches
        start = torch.cat([work[b.row].trajectory.at(target) for b in branches] or [torch.empty(0, 0)])
        start = start.to(run.model.device, torch.float32)
        prompts = [rows[b.row].source_prompt if b.is_source or use_source_prompt else rows[b.row].edit_prompt
                   for b in branches]
        # negative-prompt inversion samples with the source prompt as the unconditional branch.
        uncond = [rows[b.row].method.unconditional_prompt(rows[b.row].source_prompt, rows[b.row].negative_prompt)
                  for b in branches]
        steps = {j: uncond_steps[b.row] for j, b in enumerate(branches) if b.row in uncond_steps}
        control = step_control([b.source for b in branches],
                               [None if b.is_source else controls[b.row] for b in branches], run.sampled_steps)
        guide = _guide(run, call, use_masks=not use_source_prompt)
        args = (start, prompts, uncond, [rows[b.row].guidance_scale for b in branches], schedule.num_steps,
                start_step, [rows[b.row].seed for b in branches], run.eta, steps)
        callback = guide if guide.active else None
        if call.riders:
            out = _ride(run, call, *args, control=control, callback=callback)
            if not branches:
                continue
        else:
            out = loops.sample(run.model, *args, control=control, callback=callback)
        if x0 is None:
            x0 = torch.empty((len(rows), *out.shape[1:]), dtype=out.dtype, device=out.device)
        for j, b in enumerate(branches):
            if not b.is_source:
                x0[b.row] = out[j]
    assert x0 is not None, "a group has at least one row"
    return x0


def _ride(run: GroupRun, call: SamplingCall, x: torch.Tensor, prompts: list[str], negative_prompts: list[str],
          guidance: list[float], num_steps: int, start_step: int, seeds: list[int], eta: float,
          uncond_steps: dict[int, torch.Tensor], control: CallControl | None, callback) -> torch.Tensor:
    """The call's branches sampled with its riders inverting in the same UNet calls (``loops.sample_with_riders``);
    each rider's trajectory goes to the rows that wait on it."""
    rows, work, model = run.rows, run.work, run.model
    lead = list(call.riders)
    cond = model.conditioning(list(prompts) + [rows[i].source_prompt for i in lead],
                              list(negative_prompts) + [rows[i].negative_prompt for i in lead],
                              list(guidance) + [rows[i].inversion_guidance for i in lead])
    z = torch.cat([work[i].x0 for i in lead]).to(model.device, torch.float32)
    x, new = loops.sample_with_riders(model, x, z, cond, num_steps, start_step, seeds, eta, uncond_steps, control,
                                      callback)
    for j, i in enumerate(lead):
        work[i].trajectory, work[i].x0 = new.rows([j]), None
        share(work, work[i].members)
    return x


def _guide(run: GroupRun, call: SamplingCall, use_masks: bool = True) -> TrajectoryGuide:
    """What the call holds to the stored trajectories: direct inversion's source branches and their
    corrections, and the masked edits' outsides."""
    rows, work, schedule, start_step = run.rows, run.work, run.schedule, run.start_step
    direct = [j for j, b in enumerate(call.branches) if b.is_source and rows[b.row].method.direct]
    corrected = tuple((j, b.source) for j, b in enumerate(call.branches)
                      if not b.is_source and b.source in direct and rows[b.row].method.direct)
    masks = {j: work[b.row].latent_mask.to(run.model.device) for j, b in enumerate(call.branches)
             if use_masks and not b.is_source and work[b.row].latent_mask is not None}
    if not direct and not masks:
        return TrajectoryGuide(torch.empty(0), start_step)
    labels = [schedule.label(level) for level in range(start_step, schedule.num_steps + 1)]
    levels = torch.stack([torch.cat([work[b.row].trajectory.at(t) for b in call.branches]) for t in labels])
    blend_steps = replaced_steps(M.BLEND_FRACTION, run.sampled_steps)
    return TrajectoryGuide(levels.to(run.model.device, torch.float32), start_step, tuple(direct), corrected, masks,
                           blend_steps)


def measure_fidelity(run: GroupRun, outputs: list[EditOutput], uncond_steps: dict[int, torch.Tensor]) -> None:
    """Resample each inversion with its *source* prompt and compare with the input: how faithful it was."""
    from ddim_worker.metrics import latent_mse, psnr, ssim

    rows = run.rows
    plan = plan_sampling([RowNeeds(r.guided) for r in rows], run.batch_size)
    x0_rec = sample_plan(run, plan, [None] * len(rows), uncond_steps, use_source_prompt=True)
    reconstructions = run.model.decode(x0_rec)
    inputs = run.model.input_pixels([r.image for r in rows])
    for i, out in enumerate(outputs):
        out.reconstruction = reconstructions[i]
        out.psnr = psnr(inputs[i], reconstructions[i])
        out.ssim = ssim(inputs[i], reconstructions[i])
        out.latent_mse = latent_mse(out.trajectory.at(sampler.CLEAN_TIMESTEP)[0], x0_rec[i].cpu())
        out.sampling_passes += run.sampled_steps
