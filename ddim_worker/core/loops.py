"""The engine's DDIM loops on the model adapter: inversion, sampling, and sampling with inversions riding in the
call's free rows. Each validates its settings, encodes its prompts once and calls the UNet only through
``ModelAdapter.denoise``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from ddim_worker.core import sampler
from ddim_worker.core import schedule as sch
from ddim_worker.core.attention_control import CallControl, StepControl
from ddim_worker.core.denoiser import Conditioning
from ddim_worker.core.edit_types import validate_settings
from ddim_worker.core.model_adapter import Layout, ModelAdapter
from ddim_worker.core.sampler import Callback, Trajectory


@torch.inference_mode()
def invert(model: ModelAdapter, x: torch.Tensor, source_prompts: Sequence[str], negative_prompts: Sequence[str],
           guidance: Sequence[float], num_steps: int, start_step: int, from_level: int | None = None,
           refine: int = 0, layout: Layout = None) -> Trajectory:
    """Invert latents ``x`` (at ``from_level``, default x0) up to level ``tau[start_step]``: n - s steps from x0.
    ``layout``: the call's planned (rows per CFG half, doubled), read by the denoiser (``Conditioning``)."""
    validate_settings(num_steps, start_step, 0.0, min(guidance, default=0.0))
    cond = model.conditioning(source_prompts, negative_prompts, guidance, layout)
    return sampler.invert(model.denoise, x.to(model.device, torch.float32), model.schedule(num_steps), cond,
                          to_level=start_step, from_level=from_level, refine=refine)


def _with_uncond(cond: Conditioning, uncond_steps: dict[int, torch.Tensor] | None, k: int,
                 control: CallControl | None) -> Conditioning:
    """``cond`` at sampled step k: rows' per-step unconditional embeddings (null-text) and the call's control."""
    uncond = cond.uncond
    if uncond_steps:
        uncond = uncond.clone()
        for row, embeds in uncond_steps.items():
            uncond[row] = embeds[k].to(uncond)
    at_step: StepControl | None = control.at(k) if control is not None else None
    return replace(cond, uncond=uncond, control=at_step)


def _noise_source(model: ModelAdapter, shape: torch.Size, seeds: Sequence[int] | None, eta: float):
    """Per-row seeded noise for eta > 0 (one generator per row, seed + 1), or None."""
    if eta <= 0:
        return None
    if seeds is None:
        raise ValueError("eta > 0 needs per-row seeds")
    generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]

    def noise(_: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(model.device)

    return noise


@torch.inference_mode()
def sample(model: ModelAdapter, x: torch.Tensor, prompts: Sequence[str], negative_prompts: Sequence[str],
           guidance: Sequence[float], num_steps: int, start_step: int = 0, seeds: Sequence[int] | None = None,
           eta: float = 0.0, uncond_steps: dict[int, torch.Tensor] | None = None,
           control: CallControl | None = None, callback: Callback | None = None,
           layout: Layout = None) -> torch.Tensor:
    """DDIM-sample latents ``x`` at level ``tau[start_step]`` down to x0 (start_step 0 and noise: text-to-image).

    ``uncond_steps`` maps a row to its per-step unconditional embeddings (n - s, L, D) (null-text inversion).
    ``control`` is the call's attention control (rows reading a source row of the same call); ``callback`` may
    return new latents after each step (``trajectory_guides``).
    """
    validate_settings(num_steps, start_step, min(guidance, default=0.0), 0.0, eta)
    cond = model.conditioning(prompts, negative_prompts, guidance, layout)
    cond_at = None
    if uncond_steps or control is not None:
        def cond_at(i: int) -> Conditioning:
            return _with_uncond(cond, uncond_steps, i - start_step, control)
    noise = _noise_source(model, x.shape[1:], seeds, eta)
    return sampler.sample(model.denoise, x.to(model.device, torch.float32), model.schedule(num_steps), cond,
                          start_level=start_step, eta=eta, noise=noise, cond_at=cond_at, callback=callback)


@torch.inference_mode()
def sample_with_riders(model: ModelAdapter, x: torch.Tensor, z: torch.Tensor, cond: Conditioning, num_steps: int,
                       start_step: int, seeds: Sequence[int], eta: float,
                       uncond_steps: dict[int, torch.Tensor] | None, control: CallControl | None,
                       callback: Callback | None) -> tuple[torch.Tensor, Trajectory]:
    """``sample`` of the branches ``x`` with the riders ``z`` (x0 latents) inverting in the same UNet calls, one
    timestep per row: step k samples level s + k and inverts level n - k. ``cond`` holds the branches' rows, then
    the riders'. Each row's maths is its own, so the branches' bytes are what ``sample`` gives and the riders' are
    what ``invert`` gives. Returns the sampled x0 latents and the riders' trajectories (in the engine's dtype)."""
    schedule, n, nb = model.schedule(num_steps), num_steps, x.shape[0]
    levels = [z]
    noise = _noise_source(model, x.shape[1:], seeds, eta) if nb else None
    for k in range(n - start_step):
        i = start_step + k
        at = _with_uncond(cond, uncond_steps, k, control)
        t = torch.tensor([schedule.timesteps[i]] * nb + [schedule.timesteps[n - 1 - k]] * z.shape[0])
        eps = model.denoise(torch.cat([x, z]) if nb else z, t, at)
        if nb:
            x = sch.ddim_step(x, eps[:nb], schedule.alphas[i], schedule.alphas[i + 1], eta=eta,
                              noise=noise(i) if noise is not None else None)
            if callback is not None:
                replaced = callback({"x": x, "i": i, "t": schedule.timesteps[i], "eps": eps[:nb],
                                     "direction": "sample"})
                x = x if replaced is None else replaced
        z = sch.inversion_step(z, eps[nb:], schedule.alphas[n - k], schedule.alphas[n - 1 - k])
        levels.append(z)
    labels = [schedule.label(level) for level in range(n, start_step - 1, -1)]
    return x, Trajectory(labels, torch.stack(levels).to(model.dtype).to(torch.float32))
