"""The plan of one group's work, pure and model-free: what is stored, which unique inversions run (in their own
calls or riding in the sampling calls' free rows), the null-text chunks, the mask calls, the sampling calls, and
each row's pass charges. ``group_run`` executes it; the charges are read from the plan, not counted in the maths
(null-text's optimiser evaluations, which stop early, are the one figure known only when it has run).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ddim_worker.core import masks as M
from ddim_worker.core.attention_control import CallControl, RowControl, step_control
from ddim_worker.core.call_plan import (InversionCall, RowNeeds, SamplingCall, chunks, plan_inversions,
                                   plan_sampling)
from ddim_worker.core.edit_types import EditRow, call_needs
from ddim_worker.core.inversion import parse_method
from ddim_worker.core.sampler import Schedule

Riders = dict[int, tuple[bool, list[int]]]


@dataclass(frozen=True)
class RowCharges:
    """The passes a row is charged, known from the plan."""

    inversion: int = 0  # denoiser evaluations of its trajectory (0 when stored or shared), null-text excluded
    source: int = 0  # passes of the source branch it leads (one source branch per image)
    mask: int = 0  # predictions finding its mask (and its image's source prediction, if it leads)


@dataclass(frozen=True)
class CallStep:
    """One sampling call as the executor runs it: the call's layout (branches, riders, padding) and everything its
    rows read: prompts, guidance, seeds, null-text rows, attention control, and what the trajectory guide holds."""

    call: SamplingCall
    prompts: tuple[str, ...]  # the edit prompt, or the source prompt on source branches (and reconstructions)
    negative_prompts: tuple[str, ...]  # the unconditional prompt (negative-prompt inversion: the source prompt)
    guidance: tuple[float, ...]
    seeds: tuple[int, ...]
    null_text: tuple[tuple[int, int], ...]  # (branch, row): the row's per-step null-text embeddings as uncond
    control: CallControl | None  # Prompt-to-Prompt over the call's branches
    pinned: tuple[int, ...] = ()  # direct inversion's source branches, held on their trajectory
    corrected: tuple[tuple[int, int], ...] = ()  # (edit branch, its pinned source): the source's correction added
    masked: tuple[int, ...] = ()  # edit branches blended back to the trajectory outside their mask
    rider_prompts: tuple[str, ...] = ()  # the riders' source prompts, negative prompts and inversion guidance
    rider_negative_prompts: tuple[str, ...] = ()
    rider_guidance: tuple[float, ...] = ()


@dataclass(frozen=True)
class GroupPlan:
    """One group's work: rows that share (n, s, eta)."""

    num_steps: int
    start_step: int
    stored: tuple[int, ...]  # rows whose stored trajectory reaches tau[s]: no inversion
    shares: tuple[tuple[int, ...], ...]  # each unique inversion's rows, its leader first
    inversions: tuple[InversionCall, ...]  # the inversions run before sampling, in calls of their own
    riders: Riders  # the inversions riding in the sampling calls: leader -> (guided, its rows)
    null_key: str  # the trajectory extra holding null-text's embeddings for this start level
    null_text: tuple[tuple[int, tuple[int, ...]], ...]  # (iterations, rows): one optimisation per chunk
    null_rows: tuple[int, ...]  # every row sampled with null-text embeddings (optimised now or stored)
    mask_rows: tuple[int, ...]  # rows with mask auto; the mask calls' branch rows index into it
    mask_calls: tuple[SamplingCall, ...]
    sampling: tuple[SamplingCall, ...]
    steps: tuple[CallStep, ...] = ()  # the sampling calls with what their rows read
    fidelity: tuple[CallStep, ...] = ()  # measure_fidelity's calls: each inversion resampled with its source prompt
    charges: tuple[RowCharges, ...] = ()

    @property
    def sampled_steps(self) -> int:
        return self.num_steps - self.start_step


def null_key(schedule: Schedule, start_step: int) -> str:
    return f"null_s{schedule.label(start_step)}"


def can_ride(rows: Sequence[EditRow], members: list[int], batch_size: int | None) -> bool:
    """Whether an inversion can run in the sampling calls' free rows: from x0, one evaluation a step, with a batch
    size (so there are free rows), and wanted by nothing before sampling (null-text, masks) but its own rows'
    sampling, in calls of its own kind (guided alike)."""
    lead = rows[members[0]]
    guided = float(lead.inversion_guidance) != 1.0
    return (batch_size is not None and batch_size >= 2 and lead.cached is None
            and lead.method.name != "noise" and lead.method.refine == 0 and all(
                not rows[i].method.optimizes_null_text and rows[i].mask != "auto" and rows[i].guided == guided
                for i in members))


def plan_group(rows: Sequence[EditRow], schedule: Schedule, start_step: int, eta: float, batch_size: int | None,
               controls: Sequence[RowControl | None]) -> GroupPlan:
    """The group's plan from its rows, their attention controls and the batch size."""
    target = schedule.label(start_step)
    stored = tuple(i for i, r in enumerate(rows) if r.cached is not None and target in r.cached.timesteps)
    todo: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if i not in stored:
            todo.setdefault(row.inversion_key(), []).append(i)
    riders = {members[0]: (float(rows[members[0]].inversion_guidance) != 1.0, members)
              for members in todo.values() if can_ride(rows, members, batch_size)}
    leaders = [members[0] for members in todo.values() if members[0] not in riders]
    from_levels = [schedule.level_of(rows[i].cached.deepest) if rows[i].cached is not None
                   else schedule.num_steps for i in leaders]
    inversions = plan_inversions(leaders, from_levels, [rows[i].method.trajectory for i in leaders],
                                 [float(rows[i].inversion_guidance) != 1.0 for i in leaders], batch_size)
    key = null_key(schedule, start_step)
    null_rows = tuple(i for i, r in enumerate(rows) if r.method.optimizes_null_text)
    by_iterations: dict[int, list[int]] = {}
    for i in null_rows:
        if not (i in stored and key in rows[i].cached.extras):
            by_iterations.setdefault(rows[i].method.param, []).append(i)
    mask_rows = tuple(i for i, r in enumerate(rows) if r.mask == "auto")
    mask_calls = plan_sampling([RowNeeds(False, rows[i].inversion_key()) for i in mask_rows], batch_size)
    sampling = plan_sampling([call_needs(r) for r in rows],
                             batch_size, riders)
    null_text = tuple((it, tuple(part)) for it, group in by_iterations.items() for part in chunks(group, batch_size))
    plan = GroupPlan(schedule.num_steps, start_step, stored, tuple(tuple(m) for m in todo.values()),
                     tuple(inversions), riders, key, null_text, null_rows, mask_rows, tuple(mask_calls),
                     tuple(sampling))
    fidelity = plan_sampling([RowNeeds(r.guided) for r in rows], batch_size)
    return replace(plan, steps=tuple(call_step(rows, c, controls, plan.sampled_steps, null_rows) for c in sampling),
                   fidelity=tuple(call_step(rows, c, controls, plan.sampled_steps, null_rows, reconstruct=True)
                                  for c in fidelity),
                   charges=_charges(plan, len(rows)))


def call_step(rows: Sequence[EditRow], call: SamplingCall, controls: Sequence[RowControl | None],
              sampled_steps: int, null_rows: Sequence[int], reconstruct: bool = False) -> CallStep:
    """What one call's rows read; ``reconstruct``: every branch samples its source prompt, unmasked, uncontrolled."""
    branches = [(b, rows[b.row]) for b in call.branches]
    pinned = tuple(j for j, (b, r) in enumerate(branches) if b.is_source and r.method.pins_source)
    control = None if reconstruct else step_control([b.source for b, _ in branches],
                                                    [None if b.is_source else controls[b.row] for b, _ in branches],
                                                    sampled_steps)
    lead = [rows[i] for i in call.riders]
    return CallStep(
        call, tuple(r.source_prompt if b.is_source or reconstruct else r.edit_prompt for b, r in branches),
        tuple(r.method.unconditional_prompt(r.source_prompt, r.negative_prompt) for _, r in branches),
        tuple(r.guidance_scale for _, r in branches), tuple(r.seed for _, r in branches),
        tuple((j, b.row) for j, (b, _) in enumerate(branches) if b.row in null_rows), control, pinned,
        tuple((j, b.source) for j, (b, r) in enumerate(branches)
              if not b.is_source and b.source in pinned and r.method.adds_source_correction),
        () if reconstruct else tuple(j for j, (b, r) in enumerate(branches) if not b.is_source and r.mask == "auto"),
        tuple(r.source_prompt for r in lead), tuple(r.negative_prompt for r in lead),
        tuple(r.inversion_guidance for r in lead))


def _charges(plan: GroupPlan, n_rows: int) -> tuple[RowCharges, ...]:
    """Each row's passes from the plan: its inversion call (or ride), its first source branch, its mask calls."""
    inversion, source, mask = [0] * n_rows, [0] * n_rows, [0] * n_rows
    for call in plan.inversions:
        method = parse_method(call.method)
        passes = 0 if method.name == "noise" else (call.from_level - plan.start_step) * (1 + method.refine)
        for i in call.rows:
            inversion[i] = passes
    for leader in plan.riders:
        inversion[leader] = plan.sampled_steps
    for calls, per_call, rows in ((plan.sampling, plan.sampled_steps, None), (plan.mask_calls, M.DRAWS,
                                                                               plan.mask_rows)):
        target = source if rows is None else mask
        charged: set[int] = set()
        for call in calls:
            for b in call.branches:
                i = b.row if rows is None else rows[b.row]
                if rows is not None and not b.is_source:
                    target[i] += per_call
                elif b.is_source and i not in charged:  # one source branch per image: a split unit's copies
                    charged.add(i)  # are not ideal work
                    target[i] += per_call
    return tuple(RowCharges(*c) for c in zip(inversion, source, mask))
