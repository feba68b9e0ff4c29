"""Steps 1 and 2 of a group's edit: every row's trajectory up to tau[s] (stored, inverted once per distinct key, or
left to ride in the sampling calls' free rows) and null-text's per-step unconditional embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ddim_worker.core import loops, sampler
from ddim_worker.core import schedule as sch
from ddim_worker.core.edit_types import RowWork
from ddim_worker.core.inversion import InversionMethod, parse_method
from ddim_worker.core.model_adapter import Layout
from ddim_worker.core.sampler import Trajectory

if TYPE_CHECKING:
    from ddim_worker.core.group_state import GroupRun

def invert_unique(run: GroupRun) -> None:
    """Fill every row's trajectory up to tau[s] as the plan says: stored ones as they are, the plan's inversion
    calls now (rows continuing a shallower stored trajectory from its deepest level, the others from x0), and the
    riders' x0 latents encoded for the sampling calls they ride in; the rows of a unique inversion share it."""
    plan, rows, work = run.plan, run.rows, run.work
    for i in plan.stored:
        work[i].trajectory, work[i].cache_hit = rows[i].cached, True
    encode_riders(run, plan.riders)
    for call in plan.inversions:
        run_inversion(run, call.rows, call.from_level, parse_method(call.method), call.shape)
    for members in plan.shares:
        if members[0] not in plan.riders:
            share(work, members)
    run.model.stats.inversions += len(plan.shares)


def encode_riders(run: GroupRun, riders: dict[int, tuple[bool, list[int]]]) -> None:
    """The riders' x0 latents, encoded together (a one-level trajectory each until they have ridden)."""
    if not riders:
        return
    lead = list(riders)
    x0 = run.model.encode_images(run.model.preprocess([run.rows[i].image for i in lead]),
                                 [run.rows[i].seed for i in lead])
    for j, (i, (_, members)) in enumerate(riders.items()):
        run.work[i].x0, run.work[i].members = x0[j:j + 1], members


def share(work: list[RowWork], members: list[int]) -> None:
    """The rows after the first of a shared inversion take its trajectory."""
    for i in members[1:]:
        work[i].trajectory, work[i].shared = work[members[0]].trajectory, True
        work[i].cache_hit = work[members[0]].cache_hit


def forward_noise(x0: torch.Tensor, seeds: Sequence[int], schedule: sampler.Schedule,
                  start_step: int) -> Trajectory:
    """The img2img baseline: q(x_tau[s] | x0) with per-row seeded noise, no inversion."""
    noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s) + 2))
                         for s in seeds]).to(x0)
    noisy = sch.add_noise(x0, noise, float(schedule.alphas[start_step]))
    return Trajectory([sampler.CLEAN_TIMESTEP, schedule.label(start_step)], torch.stack([x0, noisy]))


def run_inversion(run: GroupRun, members: Sequence[int], from_level: int, method: InversionMethod,
                  layout: Layout = None) -> None:
    """One inversion call: the members' trajectories from x0 (encoded now) or from their stored deepest level;
    ``layout``: the call's as planned (``call_plan.InversionCall.layout``)."""
    model, schedule, start_step = run.model, run.schedule, run.start_step
    batch = [run.rows[i] for i in members]
    if from_level == schedule.num_steps:
        x = model.encode_images(model.preprocess([r.image for r in batch]), [r.seed for r in batch])
        prefix = None
    else:
        prefix = torch.cat([r.cached.latents for r in batch], dim=1)  # (L, B, C, h, w)
        x = prefix[-1]
    if method.name == "noise":
        new = forward_noise(x, [r.seed for r in batch], schedule, start_step)
    else:
        new = loops.invert(model, x, [r.source_prompt for r in batch], [r.negative_prompt for r in batch],
                           [r.inversion_guidance for r in batch], schedule.num_steps, start_step,
                           from_level=from_level, refine=method.refine, layout=layout)
    if prefix is not None:
        new = Trajectory(batch[0].cached.timesteps + new.timesteps[1:],
                         torch.cat([prefix.to(new.latents), new.latents[1:]]))
    # The levels in the engine's dtype (bf16 on a GPU): what is sampled from is exactly what the latent cache
    # stores, so a later edit from the cache gives the bytes a fresh inversion gives (fp32 on a CPU: unchanged).
    new = Trajectory(new.timesteps, new.latents.to(model.dtype).to(torch.float32), new.extras)
    for j, i in enumerate(members):
        run.work[i].trajectory, run.work[i].cache_hit = new.rows([j]), prefix is not None


def null_text(run: GroupRun) -> dict[int, torch.Tensor]:
    """Per-step unconditional embeddings (n - s, L, D) by row, for the rows that invert with null-text, optimised in
    the plan's chunks; kept with the trajectory, so the latent cache makes a later edit of the same image skip the
    optimisation. The optimiser's evaluations (it stops early) are added to the rows' ``null_text_passes``."""
    plan, work = run.plan, run.work
    for iterations, need in plan.null_text:
        embeds, evals = optimize_null_text(run, list(need), iterations)
        for j, i in enumerate(need):
            work[i].trajectory = work[i].trajectory.with_extra(plan.null_key, embeds[:, j:j + 1].cpu())
            work[i].null_text_passes += evals
    return {i: work[i].trajectory.extras[plan.null_key][:, 0] for i in plan.null_rows}


def optimize_null_text(run: GroupRun, need: list[int], iterations: int) -> tuple[torch.Tensor, int]:
    """Null-text embeddings (n - s, B, L, D) for these rows, optimised against their trajectories (through the
    model adapter's ``conditional``, on the adapter's denoiser)."""
    from ddim_worker.core.null_text import optimize_null_text as optimize

    model, rows = run.model, [run.rows[i] for i in need]
    trajectories = [run.work[i].trajectory for i in need]
    text = model.encode_prompts([r.source_prompt for r in rows])
    uncond = model.encode_prompts([r.negative_prompt for r in rows])
    with torch.inference_mode(False):  # autograd needs tensors made outside inference mode
        trajectory = Trajectory(list(trajectories[0].timesteps),
                                torch.cat([tr.latents for tr in trajectories], dim=1).clone().to(model.device))
        embeds, evals = optimize(model.conditional, trajectory, run.schedule, run.start_step, text.clone(),
                                 uncond.clone(), torch.tensor([float(r.guidance_scale) for r in rows]), iterations)
    return embeds.detach(), evals
