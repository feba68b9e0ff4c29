"""Steps 1 and 2 of a group's edit: every row's trajectory up to tau[s] (stored, inverted once per distinct key, or
left to ride in the sampling calls' free rows) and null-text's per-step unconditional embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ddim_worker import loops, sampler
from ddim_worker import schedule as sch
from ddim_worker.call_plan import chunks, plan_inversions
from ddim_worker.edit_types import RowWork
from ddim_worker.inversion import InversionMethod, parse_method
from ddim_worker.sampler import Trajectory

if TYPE_CHECKING:
    from ddim_worker.group_run import GroupRun

Riders = dict[int, tuple[bool, list[int]]]


def invert_unique(run: GroupRun) -> Riders:
    """Fill every row's trajectory up to tau[s]: stored ones as they are, the rest inverted once per distinct
    (image, source prompt, inversion settings); rows continuing a shallower stored trajectory start from its
    deepest level, the others from x0, in calls of their own. Returns the inversions left to ride: leading row ->
    (guided, the rows that wait on it)."""
    rows, work, schedule = run.rows, run.work, run.schedule
    target = schedule.label(run.start_step)
    todo: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row.cached is not None and target in row.cached.timesteps:
            work[i].trajectory, work[i].cache_hit = row.cached, True
        else:
            todo.setdefault(row.inversion_key(), []).append(i)
    riders = {members[0]: (float(rows[members[0]].inversion_guidance) != 1.0, members)
              for members in todo.values() if can_ride(run, members)}
    encode_riders(run, riders)
    leaders = [members[0] for members in todo.values() if members[0] not in riders]
    from_levels = [schedule.level_of(rows[i].cached.deepest) if rows[i].cached is not None
                   else schedule.num_steps for i in leaders]
    guided = [float(rows[i].inversion_guidance) != 1.0 for i in leaders]
    for call in plan_inversions(leaders, from_levels, [rows[i].method.trajectory for i in leaders], guided,
                                run.batch_size):
        run_inversion(run, call.rows, call.from_level, parse_method(call.method))
    for members in todo.values():
        if members[0] not in riders:
            share(work, members)
    run.model.stats.inversions += len(leaders) + len(riders)
    return riders


def can_ride(run: GroupRun, members: list[int]) -> bool:
    """Whether an inversion can run in the sampling calls' free rows: from x0, one evaluation a step, with a batch
    size (so there are free rows), and wanted by nothing before sampling (null-text, masks) but its own rows'
    sampling, in calls of its own kind (guided alike)."""
    rows, batch_size = run.rows, run.batch_size
    lead = rows[members[0]]
    guided = float(lead.inversion_guidance) != 1.0
    return (batch_size is not None and batch_size >= 2 and lead.cached is None
            and lead.method.name != "noise" and lead.method.refine == 0 and all(
                not rows[i].method.optimizes_null_text and rows[i].mask != "auto" and rows[i].guided == guided
                for i in members))


def encode_riders(run: GroupRun, riders: Riders) -> None:
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


def run_inversion(run: GroupRun, members: Sequence[int], from_level: int, method: InversionMethod) -> None:
    """One inversion call: the members' trajectories from x0 (encoded now) or from their stored deepest level."""
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
        passes = 0
    else:
        new = loops.invert(model, x, [r.source_prompt for r in batch], [r.negative_prompt for r in batch],
                           [r.inversion_guidance for r in batch], schedule.num_steps, start_step,
                           from_level=from_level, refine=method.refine)
        passes = (from_level - start_step) * (1 + method.refine)
    if prefix is not None:
        new = Trajectory(batch[0].cached.timesteps + new.timesteps[1:],
                         torch.cat([prefix.to(new.latents), new.latents[1:]]))
    # The levels in the engine's dtype (bf16 on a GPU): what is sampled from is exactly what the latent cache
    # stores, so a later edit from the cache gives the bytes a fresh inversion gives (fp32 on a CPU: unchanged).
    new = Trajectory(new.timesteps, new.latents.to(model.dtype).to(torch.float32), new.extras)
    for j, i in enumerate(members):
        run.work[i].trajectory, run.work[i].inversion_passes = new.rows([j]), passes
        run.work[i].cache_hit = prefix is not None


def null_text(run: GroupRun) -> dict[int, torch.Tensor]:
    """Per-step unconditional embeddings (n - s, L, D) by row, for the rows that invert with null-text; kept with
    the trajectory, so the latent cache makes a later edit of the same image skip the optimisation."""
    rows, work = run.rows, run.work
    null_key = f"null_s{run.schedule.label(run.start_step)}"
    null_rows = [i for i, r in enumerate(rows) if r.method.optimizes_null_text]
    by_iterations: dict[int, list[int]] = {}
    for i in null_rows:
        if null_key not in work[i].trajectory.extras:
            by_iterations.setdefault(rows[i].method.param, []).append(i)
    for iterations, group in by_iterations.items():  # each row its own iteration count (null-text:K)
        for need in chunks(group, run.batch_size):
            embeds, evals = optimize_null_text(run, need, iterations)
            for j, i in enumerate(need):
                work[i].trajectory = work[i].trajectory.with_extra(null_key, embeds[:, j:j + 1].cpu())
                work[i].inversion_passes += evals
    return {i: work[i].trajectory.extras[null_key][:, 0] for i in null_rows}


def optimize_null_text(run: GroupRun, need: list[int], iterations: int) -> tuple[torch.Tensor, int]:
    """Null-text embeddings (n - s, B, L, D) for these rows, optimised against their trajectories (through the
    model adapter's ``conditional``, on the adapter's denoiser)."""
    from ddim_worker.null_text import optimize_null_text as optimize

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
