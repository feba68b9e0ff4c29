"""Schedule maths against diffusers' own schedulers, and the invert/sample alignment that pins the off-by-one."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from ddim_worker.core import sampler
from ddim_worker.core import schedule as sch
from ddim_worker.core.sampler import Schedule
from ddim_worker.tiny_model import SD15_SCHEDULER_CONFIG

SPACINGS = [
    {**SD15_SCHEDULER_CONFIG},
    {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0},
    {**SD15_SCHEDULER_CONFIG, "timestep_spacing": "linspace", "steps_offset": 0},
    {**SD15_SCHEDULER_CONFIG, "set_alpha_to_one": True, "beta_schedule": "linear", "beta_start": 0.0001,
     "beta_end": 0.02},
]


@pytest.mark.parametrize("config", SPACINGS)
@pytest.mark.parametrize("num_steps", [1, 7, 10, 50, 250])
def test_timesteps_and_alphas_match_ddim_scheduler(config, num_steps):
    scheduler = DDIMScheduler(**config)
    scheduler.set_timesteps(num_steps)
    assert sch.inference_timesteps(config, num_steps) == scheduler.timesteps.tolist()
    alphas = sch.make_alphas_cumprod(config)
    torch.testing.assert_close(alphas, scheduler.alphas_cumprod, rtol=0, atol=0)
    assert sch.final_alpha_cumprod(config, alphas) == pytest.approx(float(scheduler.final_alpha_cumprod))


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_final_alpha_follows_config(set_alpha_to_one):
    config = {**SD15_SCHEDULER_CONFIG, "set_alpha_to_one": set_alpha_to_one}
    alphas = sch.make_alphas_cumprod(config)
    expected = 1.0 if set_alpha_to_one else float(alphas[0])
    assert sch.final_alpha_cumprod(config, alphas) == expected
    assert Schedule.from_config(config, 10).alphas[-1].item() == pytest.approx(expected)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("num_steps", [5, 50])
def test_inversion_step_equals_ddim_inverse_scheduler(set_alpha_to_one, num_steps):
    config = {**SD15_SCHEDULER_CONFIG, "set_alpha_to_one": set_alpha_to_one}
    inverse = DDIMInverseScheduler(**config)
    inverse.set_timesteps(num_steps)
    schedule = Schedule.from_config(config, num_steps)
    # The inverse scheduler walks tau backwards: its k-th timestep is our tau[n-1-k], moving from level n-k to n-1-k.
    assert inverse.timesteps.tolist() == list(reversed(schedule.timesteps))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    for k, t in enumerate(inverse.timesteps):
        i = num_steps - 1 - k
        eps = torch.randn(2, 4, 8, 8, generator=gen)
        expected = inverse.step(eps, t, x).prev_sample
        ours = sch.inversion_step(x, eps, schedule.alphas[i + 1], schedule.alphas[i])
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_ddim_scheduler(eta):
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    schedule = Schedule.from_config(SD15_SCHEDULER_CONFIG, 20)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=gen)
    for i, t in enumerate(scheduler.timesteps):
        eps = torch.randn(3, 4, 8, 8, generator=gen)
        noise = torch.randn(3, 4, 8, 8, generator=gen)
        expected = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        ours = sch.ddim_step(x, eps, schedule.alphas[i], schedule.alphas[i + 1], eta=eta, noise=noise)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        x = expected


def test_eta_without_noise_is_refused():
    with pytest.raises(ValueError, match="noise"):
        sch.ddim_step(torch.zeros(1), torch.zeros(1), 0.5, 0.9, eta=0.3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10"])
def test_bad_step_counts_are_refused(bad):
    with pytest.raises(ValueError, match="num_steps"):
        sch.inference_timesteps(SD15_SCHEDULER_CONFIG, bad)


# -- alignment: an analytic denoiser whose prediction ignores x makes DDIM exactly invertible ----------------------

def x_independent_denoiser(x: torch.Tensor, t: int, cond) -> torch.Tensor:
    """eps depends on the timestep (and a fixed pattern) but not on x: the one case where inversion is exact."""
    pattern = torch.linspace(-1, 1, x[0].numel(), dtype=torch.float64).reshape(x.shape[1:])
    return (torch.sin(torch.tensor(t / 97.0, dtype=torch.float64)) * pattern).to(x.dtype).expand_as(x)


def textbook_invert_then_sample(x0: torch.Tensor, num_steps: int, start_step: int) -> torch.Tensor:
    """The notebook's indexing, written out: invert all the way with its loop, then start sampling at tau[s] from
    ``inverted_latents[-(start_step + 1)]``, stepping with ``prev_t = max(1, t - 1000 // n)``."""
    config = SD15_SCHEDULER_CONFIG
    abar = sch.make_alphas_cumprod(config).double()
    timesteps = sch.inference_timesteps(config, num_steps)
    # invert(): for i in 1..n-1 (skipping the last), t = reversed(timesteps)[i]
    forward = list(reversed(timesteps))
    latents = x0.clone()
    intermediate = []
    for i in range(1, num_steps):
        if i >= num_steps - 1:
            continue
        t = forward[i]
        eps = x_independent_denoiser(latents, t, None)
        current_t = max(0, t - 1000 // num_steps)
        alpha_t, alpha_t_next = abar[current_t], abar[t]
        latents = (latents - (1 - alpha_t).sqrt() * eps) * (alpha_t_next.sqrt() / alpha_t.sqrt()) + (
            1 - alpha_t_next).sqrt() * eps
        intermediate.append(latents)
    latents = intermediate[-(start_step + 1)].clone()
    # sample()
    for i in range(start_step, num_steps):
        t = timesteps[i]
        eps = x_independent_denoiser(latents, t, None)
        prev_t = max(1, t - 1000 // num_steps)
        alpha_t, alpha_t_prev = abar[t], abar[prev_t]
        predicted_x0 = (latents - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
        latents = alpha_t_prev.sqrt() * predicted_x0 + (1 - alpha_t_prev).sqrt() * eps
    return latents


@pytest.mark.parametrize("num_steps,start_step", [(10, 2), (50, 10), (50, 0), (25, 24), (250, 30)])
def test_invert_then_sample_reproduces_x0(num_steps, start_step):
    schedule = Schedule.from_config(SD15_SCHEDULER_CONFIG, num_steps)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    trajectory = sampler.invert(x_independent_denoiser, x0, schedule, None, to_level=start_step)
    assert trajectory.latents.shape[0] == num_steps - start_step + 1
    assert trajectory.timesteps[0] == sampler.CLEAN_TIMESTEP
    assert trajectory.timesteps[-1] == schedule.timesteps[start_step]
    back = sampler.sample(x_independent_denoiser, trajectory.at(schedule.timesteps[start_step]), schedule, None,
                          start_level=start_step)
    torch.testing.assert_close(back, x0, rtol=0, atol=1e-10)


@pytest.mark.parametrize("num_steps,start_step", [(10, 2), (50, 10), (250, 30)])
def test_textbook_indexing_does_not_reproduce_x0(num_steps, start_step):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    back = textbook_invert_then_sample(x0, num_steps, start_step)
    assert (back - x0).abs().max() > 1e-3


def test_fixed_point_refinement_costs_what_it_says():
    calls = []

    def counting(x, t, cond):
        calls.append(t)
        return x_independent_denoiser(x, t, cond)

    schedule = Schedule.from_config(SD15_SCHEDULER_CONFIG, 10)
    sampler.invert(counting, torch.zeros(1, 4, 8, 8, dtype=torch.float64), schedule, None, to_level=3, refine=2)
    assert len(calls) == (10 - 3) * 3
