"""The executor of one group's plan (``group_plan``: rows that share (n, s, eta)), in numbered steps over a
``GroupRun``: the group's rows, schedule, plan, and what has been worked out per row so far (``RowWork``).

Steps: 0. the plan; 1. trajectories (``inversion_steps``); 2. null-text embeddings (``inversion_steps``); 3. masks
(``mask_step``); 4. sampling (``sampling_steps``); 5. decoding and outputs, with the plan's pass charges;
6. fidelity (``sampling_steps``). Every UNet call goes through the run's ``ModelAdapter``.
"""

from __future__ import annotations

import torch

from ddim_worker.core import masks as M
from ddim_worker.core.attention_control import RowControl
from ddim_worker.core import inversion_steps, mask_step, sampling_steps
from ddim_worker.core.edit_types import EditOutput, EditRow
from ddim_worker.core.sampler import to_cpu
from ddim_worker.core.group_plan import plan_group
from ddim_worker.core.group_state import GroupRun
from ddim_worker.core.model_adapter import ModelAdapter


def edit_group(model: ModelAdapter, rows: list[EditRow], num_steps: int, start_step: int, eta: float,
               measure_fidelity: bool = False) -> list[EditOutput]:
    """Edit rows that share (n, s, eta): invert what is not stored, plan the sampling calls, sample, decode."""
    # 0. The plan: attention control per row (its token map), then every call of the group and each row's charges.
    schedule = model.schedule(num_steps)
    controls = [model.row_control(r) for r in rows]
    plan = plan_group(rows, schedule, start_step, eta, model.batch_size, controls)
    run = GroupRun(model, rows, schedule, start_step, eta, plan)
    # 1. Stored trajectories that reach tau[s] need no inversion; the others are inverted once per distinct key,
    #    now, or riding in the sampling calls' free rows (``plan.riders``).
    inversion_steps.invert_unique(run)
    # 2. null-text: per-step unconditional embeddings, optimised once per row and kept with the trajectory.
    uncond_steps = inversion_steps.null_text(run)
    # 3. Masks (mask auto): where the edit prompt changes the predictions, voted by the image's regions.
    mask_step.find_masks(run)
    # 4. Sample every call of the plan: edit branches beside their source branches, held to the trajectories.
    x0 = sampling_steps.sample_plan(run, plan.steps, uncond_steps)
    # 5. Decode and report.
    outputs = _outputs(run, x0, controls)
    # 6. Fidelity: each inversion resampled with its source prompt, compared with the input.
    if measure_fidelity:
        sampling_steps.measure_fidelity(run, outputs, uncond_steps)
    return outputs


def _outputs(run: GroupRun, x0: torch.Tensor, controls: list[RowControl | None]) -> list[EditOutput]:
    """Decoded edits (pasted back outside their masks) and each row's figures (passes: the plan's charges)."""
    images = run.model.decode(x0)
    for i, w in enumerate(run.work):
        if w.mask is not None:  # outside the mask the pixels are the input's
            images[i] = M.paste_back(images[i], w.input_pixels, w.mask)
    # One copy off the device per trajectory: the edit rows of one image share theirs (step 1).
    handed = {id(w.trajectory): to_cpu(w.trajectory, run.model.dtype) for w in run.work}
    charges = run.plan.charges
    return [
        EditOutput(images[i], handed[id(w.trajectory)], charges[i].inversion + w.null_text_passes,
                   run.sampled_steps, w.cache_hit, w.shared, source_passes=charges[i].source,
                   mask_passes=charges[i].mask,
                   attention_control=controls[i].tokens.kind if controls[i] is not None else "none",
                   mask=M.mask_image(w.mask) if w.mask is not None else None, latent=x0[i].float().cpu())
        for i, w in enumerate(run.work)
    ]
