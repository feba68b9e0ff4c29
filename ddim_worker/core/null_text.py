"""Null-text inversion (Mokady et al., 2023): optimise the unconditional embedding per sampling step so that guided
sampling retraces the inversion trajectory. Costly (a small optimisation per step), so the result is cached.

``eps_fn(x, t, context) -> eps`` is one conditional noise prediction (the UNet without guidance, or an analytic
stand-in in tests); it must be differentiable in ``context``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ddim_worker.core import schedule as sch
from ddim_worker.core.sampler import Schedule, Trajectory

EpsFn = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

#: Adam's learning rate, decayed over the steps as in the paper (1e-2 * (1 - step / 100)).
LEARNING_RATE = 1e-2
#: Stop a step's optimisation early once the latent matches the trajectory this closely (mean squared error).
EARLY_STOP = 1e-5


def optimize_null_text(eps_fn: EpsFn, trajectory: Trajectory, schedule: Schedule, start_level: int,
                       text: torch.Tensor, uncond: torch.Tensor, guidance: torch.Tensor,
                       iterations: int) -> tuple[torch.Tensor, int]:
    """Per-step unconditional embeddings, shape (n - s, B, L, D), and the eps evaluations spent.

    ``trajectory`` holds the inverted latents from x0 up to level ``start_level`` (cleanest first), batch B;
    ``text``/``uncond`` are (B, L, D); ``guidance`` is (B,).
    """
    n = schedule.num_steps
    w = guidance.to(text.device, torch.float32).view(-1, 1, 1, 1)
    z = trajectory.at(schedule.label(start_level)).float()
    current = uncond.detach().float().clone()
    embeddings, evals = [], 0
    for i in range(start_level, n):
        t = schedule.timesteps[i]
        target = trajectory.at(schedule.label(i + 1)).float()
        alpha_t, alpha_prev = schedule.alphas[i], schedule.alphas[i + 1]
        with torch.no_grad():
            eps_text = eps_fn(z, t, text).float()
        evals += 1
        current = current.detach().requires_grad_(True)
        optimizer = torch.optim.Adam([current], lr=LEARNING_RATE * (1 - (i - start_level) / 100))
        for _ in range(iterations):
            with torch.enable_grad():
                eps_uncond = eps_fn(z, t, current).float()
                eps = eps_uncond + w * (eps_text - eps_uncond)
                z_prev = sch.ddim_step(z, eps, alpha_t, alpha_prev)
                loss = torch.nn.functional.mse_loss(z_prev, target, reduction="none").mean(dim=(1, 2, 3))
                optimizer.zero_grad()
                loss.sum().backward()  # rows are independent: summing keeps each row's gradient its own
            optimizer.step()
            evals += 1
            if float(loss.detach().max()) < EARLY_STOP:
                break
        current = current.detach()
        embeddings.append(current.clone())
        with torch.no_grad():
            eps_uncond = eps_fn(z, t, current).float()
            z = sch.ddim_step(z, eps_uncond + w * (eps_text - eps_uncond), alpha_t, alpha_prev)
        evals += 1
    return torch.stack(embeddings), evals
