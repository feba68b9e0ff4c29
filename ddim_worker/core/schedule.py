"""DDIM schedule maths: pure functions over the model's own scheduler config.

Nothing here touches a model, a file or Ray. Notation (DDIM paper, eq. 12, with the DDPM "alpha bar"):

- ``alpha_prod_t``       -> abar[t], cumulative product of (1 - beta) up to training timestep t
- ``alpha_prod_t_prev``  -> abar at the *less* noisy level the step moves to (sampling) or comes from (inversion)
- ``pred_original_sample`` -> x0_hat, the clean latent implied by the noise prediction
- ``pred_epsilon``       -> eps, the (guided) noise prediction
- ``std_dev_t``          -> sigma_t, eta-scaled DDPM posterior standard deviation

Levels. With n inference steps the schedule is ``tau[0] > tau[1] > ... > tau[n-1]``; the clean latent x0 sits at a
level of its own whose alpha is ``final_alpha_cumprod`` (1.0 or ``abar[0]``, as ``set_alpha_to_one`` says). Sampling
step i goes from level ``tau[i]`` to ``tau[i+1]`` (to x0 after the last), evaluating the denoiser at ``tau[i]``.
Inversion step i is its mirror: from ``tau[i+1]`` (or x0) up to ``tau[i]``, evaluating the denoiser with the target
timestep ``tau[i]`` at the current, less noisy latent, as diffusers' ``DDIMInverseScheduler`` does. With that pairing
a denoiser whose output does not depend on x makes invert-then-sample the identity, which pins the textbook's
off-by-one (it starts sampling at ``tau[s]`` from the latent at ``tau[s+1]``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def make_alphas_cumprod(config: Mapping[str, Any]) -> torch.Tensor:
    """abar[t] for t in 0..T-1, from a diffusers scheduler config (``beta_schedule`` and its parameters)."""
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    beta_start = float(config.get("beta_start", 0.0001))
    beta_end = float(config.get("beta_end", 0.02))
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta).
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = _betas_for_cosine_alpha_bar(num_train_timesteps)
    else:
        raise ValueError(
            f"beta_schedule {schedule!r} is not supported; use 'linear', 'scaled_linear' or 'squaredcos_cap_v2'"
        )
    return torch.cumprod(1.0 - betas, dim=0)


def _betas_for_cosine_alpha_bar(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's cosine schedule, as diffusers' ``betas_for_alpha_bar``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def final_alpha_cumprod(config: Mapping[str, Any], alphas_cumprod: torch.Tensor) -> float:
    """The alpha of the clean level x0: 1.0 when ``set_alpha_to_one``, else abar[0] (SD 1.x ships ``False``)."""
    return 1.0 if config.get("set_alpha_to_one", True) else float(alphas_cumprod[0])


def inference_timesteps(config: Mapping[str, Any], num_steps: int) -> list[int]:
    """The n training timesteps DDIM visits, noisiest first, exactly as ``DDIMScheduler.set_timesteps`` picks them.

    Honours ``timestep_spacing`` (``leading``, ``trailing``, ``linspace``) and ``steps_offset``.
    """
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the model's num_train_timesteps={num_train_timesteps}")
    spacing = config.get("timestep_spacing", "leading")
    steps_offset = int(config.get("steps_offset", 0))
    if spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.int64) + steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported; use 'leading', 'trailing' or 'linspace'")
    return [int(t) for t in timesteps]


def level_alphas(timesteps: list[int], alphas_cumprod: torch.Tensor, final_alpha: float) -> torch.Tensor:
    """abar at each level, noisiest first, with the clean level appended: shape (n + 1,), float64."""
    alphas = [float(alphas_cumprod[t]) for t in timesteps] + [final_alpha]
    return torch.tensor(alphas, dtype=torch.float64)


def ddim_step(
    sample: torch.Tensor,
    pred_epsilon: torch.Tensor,
    alpha_prod_t: float | torch.Tensor,
    alpha_prod_t_prev: float | torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update from the level with ``alpha_prod_t`` to the level with ``alpha_prod_t_prev``.

    Used both ways: sampling moves to a less noisy level (``alpha_prod_t_prev > alpha_prod_t``); inversion calls it with
    the two alphas swapped, so there is one copy of the maths. ``eta > 0`` needs ``noise`` (the caller seeds it) and only
    makes sense when sampling. Alphas may be tensors broadcastable to ``sample`` for per-row levels.
    """
    dtype = sample.dtype
    # Compute in float32 at least: bf16/fp16 latents lose the small differences the step is made of.
    work = torch.promote_types(dtype, torch.float32)
    x = sample.to(work)
    eps = pred_epsilon.to(work)
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=work, device=x.device)
    alpha_prod_t_prev = torch.as_tensor(alpha_prod_t_prev, dtype=work, device=x.device)
    beta_prod_t = 1 - alpha_prod_t

    # 1. predicted x_0, "f_theta(x_t, t)" of formula (12)
    pred_original_sample = (x - beta_prod_t.sqrt() * eps) / alpha_prod_t.sqrt()

    # 2. sigma_t(eta), formula (16): eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs noise: pass a seeded tensor so the result is reproducible")
        variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance.clamp(min=0).sqrt()
    else:
        std_dev_t = torch.zeros((), dtype=work, device=x.device)

    # 3. "direction pointing to x_t" of formula (12)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0).sqrt() * eps

    # 4. x_{t-1} of formula (12), plus fresh noise when eta > 0
    prev_sample = alpha_prod_t_prev.sqrt() * pred_original_sample + pred_sample_direction
    if eta > 0:
        prev_sample = prev_sample + std_dev_t * noise.to(work)
    return prev_sample.to(dtype)


def pred_original_sample(sample: torch.Tensor, pred_epsilon: torch.Tensor,
                         alpha_prod_t: float | torch.Tensor) -> torch.Tensor:
    """x0_hat, the clean latent a noise prediction implies at the level with ``alpha_prod_t`` (step 1 of
    ``ddim_step``): ``(x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``."""
    x, eps = sample.float(), pred_epsilon.float()
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=x.device)
    return (x - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()


def inversion_step(
    sample: torch.Tensor,
    pred_epsilon: torch.Tensor,
    alpha_prod_from: float | torch.Tensor,
    alpha_prod_to: float | torch.Tensor,
) -> torch.Tensor:
    """One deterministic inversion update, from a cleaner level up to a noisier one: ``ddim_step`` reversed."""
    return ddim_step(sample, pred_epsilon, alpha_prod_from, alpha_prod_to, eta=0.0)


def add_noise(
    original: torch.Tensor, noise: torch.Tensor, alpha_prod_t: float | torch.Tensor
) -> torch.Tensor:
    """Forward process q(x_t | x_0): the img2img baseline that inversion is compared against."""
    alpha_prod_t = torch.as_tensor(alpha_prod_t, dtype=torch.float32, device=original.device)
    out = alpha_prod_t.sqrt() * original.float() + (1 - alpha_prod_t).sqrt() * noise.float()
    return out.to(original.dtype)
