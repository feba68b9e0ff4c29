"""DDIM inversion and sampling loops over a denoiser callable (k-diffusion style).

The loops know nothing about UNets, text or images: ``eps = denoiser(x, t, cond)`` with ``x`` of shape
``(B, C, h, w)``, ``t`` a training timestep (int) and ``cond`` whatever the denoiser needs (it rides along untouched).
Levels are indexed 0..n: level i < n is timestep ``tau[i]`` and level n is the clean latent x0 (see ``schedule``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ddim_worker.core import schedule as sch

Denoiser = Callable[[torch.Tensor, int, Any], torch.Tensor]
NoiseSource = Callable[[int], torch.Tensor]
Callback = Callable[[dict[str, Any]], Any]

#: The label of the clean level x0 in a trajectory; it has no training timestep.
CLEAN_TIMESTEP = -1


@dataclass(frozen=True)
class Schedule:
    """The n DDIM timesteps of one (model, n) pair and the alpha of every level, x0 included."""

    timesteps: tuple[int, ...]  # tau[0] > ... > tau[n-1]
    alphas: torch.Tensor  # (n + 1,) float64: abar[tau[i]] for i < n, then the final alpha for x0

    @classmethod
    def from_config(cls, config: Mapping[str, Any], num_steps: int) -> Schedule:
        alphas_cumprod = sch.make_alphas_cumprod(config)
        timesteps = sch.inference_timesteps(config, num_steps)
        final = sch.final_alpha_cumprod(config, alphas_cumprod)
        return cls(tuple(timesteps), sch.level_alphas(timesteps, alphas_cumprod, final))

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def label(self, level: int) -> int:
        """The timestep a level is labelled with (``CLEAN_TIMESTEP`` for x0)."""
        return self.timesteps[level] if level < self.num_steps else CLEAN_TIMESTEP

    def level_of(self, timestep: int) -> int:
        return self.num_steps if timestep == CLEAN_TIMESTEP else self.timesteps.index(timestep)


@dataclass
class Trajectory:
    """Inverted latents, cleanest first, each labelled by its timestep (x0 by ``CLEAN_TIMESTEP``).

    ``latents`` has shape (L, B, C, h, w): L levels for a batch of B rows.
    """

    timesteps: list[int]
    latents: torch.Tensor
    # Per-row tensors that belong with the trajectory, batch in dimension 1: e.g. null-text embeddings
    # ``null_s<t>`` of shape (n - s, B, L, D), optimised for sampling from level t.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def at(self, timestep: int) -> torch.Tensor:
        """The batch of latents at one level, shape (B, C, h, w)."""
        return self.latents[self.timesteps.index(timestep)]

    @property
    def deepest(self) -> int:
        return self.timesteps[-1]

    def rows(self, index: torch.Tensor | list[int]) -> Trajectory:
        return Trajectory(list(self.timesteps), self.latents[:, index],
                          {k: v[:, index] for k, v in self.extras.items()})

    def with_extra(self, name: str, value: torch.Tensor) -> Trajectory:
        return Trajectory(list(self.timesteps), self.latents, {**self.extras, name: value})


def invert(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    cond: Any,
    to_level: int,
    from_level: int | None = None,
    refine: int = 0,
    callback: Callback | None = None,
) -> Trajectory:
    """Invert ``x`` (at ``from_level``, default x0) up to level ``to_level``: ``from_level - to_level`` steps.

    Step i moves from level i + 1 to level i and evaluates the denoiser with timestep ``tau[i]`` at the current,
    cleaner latent (``DDIMInverseScheduler``'s pairing). ``refine`` > 0 re-evaluates the noise at the new point that
    many times per step (fixed-point inversion), so a step costs ``1 + refine`` denoiser calls.
    """
    n = schedule.num_steps
    from_level = n if from_level is None else from_level
    if not 0 <= to_level <= from_level <= n:
        raise ValueError(f"need 0 <= to_level ({to_level}) <= from_level ({from_level}) <= n ({n})")
    levels = [x]
    for i in range(from_level - 1, to_level - 1, -1):
        t = schedule.timesteps[i]
        alpha_from, alpha_to = schedule.alphas[i + 1], schedule.alphas[i]
        eps = denoiser(x, t, cond)
        x_next = sch.inversion_step(x, eps, alpha_from, alpha_to)
        for _ in range(refine):
            # Fixed point of x_next = step(x, eps(x_next)): the exact inverse of the sampling step at level i.
            eps = denoiser(x_next, t, cond)
            x_next = sch.inversion_step(x, eps, alpha_from, alpha_to)
        x = x_next
        levels.append(x)
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "eps": eps, "direction": "invert"})
    labels = [schedule.label(level) for level in range(from_level, to_level - 1, -1)]
    return Trajectory(labels, torch.stack(levels))


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: Schedule,
    cond: Any,
    start_level: int = 0,
    eta: float = 0.0,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    cond_at: Callable[[int], Any] | None = None,
) -> torch.Tensor:
    """DDIM sampling from ``x`` at level ``start_level`` (timestep ``tau[start_level]``) down to x0.

    ``n - start_level`` denoiser calls. With ``start_level = 0`` and Gaussian ``x`` this is text-to-image DDIM.
    ``eta > 0`` draws fresh noise from ``noise(i)`` at every step; the caller seeds it per row. ``cond_at(i)``, when
    given, replaces ``cond`` at step i (null-text inversion's per-step unconditional embeddings, attention control).
    ``callback`` sees each step's result (``x`` at level i + 1) and may return new latents to go on from (local
    blending, direct inversion), as diffusers' ``callback_on_step_end`` may.
    """
    n = schedule.num_steps
    if not 0 <= start_level < n:
        raise ValueError(f"start_level must be in [0, {n}), got {start_level}")
    if eta > 0 and noise is None:
        raise ValueError("eta > 0 needs a noise source so the result is reproducible")
    for i in range(start_level, n):
        t = schedule.timesteps[i]
        eps = denoiser(x, t, cond_at(i) if cond_at is not None else cond)
        step_noise = noise(i) if eta > 0 else None
        x = sch.ddim_step(x, eps, schedule.alphas[i], schedule.alphas[i + 1], eta=eta, noise=step_noise)
        if callback is not None:
            replaced = callback({"x": x, "i": i, "t": t, "eps": eps, "direction": "sample"})
            x = x if replaced is None else replaced
    return x


def to_cpu(trajectory: Trajectory, dtype: torch.dtype) -> Trajectory:
    """A trajectory to hand on (the latent cache, the actor's memory): levels in the engine's ``dtype``, in which
    they are exact (see ``inversion_steps.run_inversion``), half the bytes of fp32 in bf16; extras (null-text
    embeddings) in fp32."""
    return Trajectory(list(trajectory.timesteps), trajectory.latents.detach().to("cpu", dtype),
                      {k: v.detach().to("cpu", torch.float32) for k, v in trajectory.extras.items()})
