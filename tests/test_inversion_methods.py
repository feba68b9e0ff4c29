"""Inversion methods: fixed-point refinement and null-text inversion against plain DDIM, with analytic denoisers
where plain inversion is inexact (the prediction depends on x), then on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim_worker.core import sampler
from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.core.inversion import parse_method
from ddim_worker.core.null_text import optimize_null_text
from ddim_worker.core.sampler import Schedule
from ddim_worker.tiny_model import SD15_SCHEDULER_CONFIG
from tests.test_engine import test_image

N, S = 20, 4
SCHEDULE = Schedule.from_config(SD15_SCHEDULER_CONFIG, N)
X0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def eps_fn(x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
    """A noise prediction that depends on x (so DDIM inversion drifts) and on a text context (B, L, D) whose
    L * D = 256 entries act one per latent element, as cross-attention lets an embedding act everywhere."""
    scale = t / 1000.0
    return 0.6 * torch.tanh(x) * scale + context.reshape(x.shape).to(x.dtype) * (1 + 0.5 * x.sin())


def guided(text: torch.Tensor, uncond: torch.Tensor, w: float):
    def denoiser(x, t, cond):
        e_u, e_t = eps_fn(x, t, uncond), eps_fn(x, t, text)
        return e_u + w * (e_t - e_u)
    return denoiser


TEXT = torch.full((2, 16, 16), 0.2, dtype=torch.float64)
UNCOND = torch.zeros((2, 16, 16), dtype=torch.float64)


def reconstruction_error(refine: int = 0, w: float = 1.0) -> float:
    denoiser = guided(TEXT, UNCOND, w)
    trajectory = sampler.invert(denoiser, X0, SCHEDULE, None, to_level=S, refine=refine)
    back = sampler.sample(denoiser, trajectory.at(SCHEDULE.timesteps[S]), SCHEDULE, None, start_level=S)
    return float(((back - X0) ** 2).mean())


def test_fixed_point_refinement_lowers_the_error_monotonically():
    errors = [reconstruction_error(refine=k) for k in range(5)]
    print("fixed-point:K reconstruction MSE, K = 0..4:", [f"{e:.3e}" for e in errors])
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-6  # plain inversion really is inexact with this denoiser


def test_null_text_beats_plain_ddim_under_guidance():
    w = 3.0
    denoiser = guided(TEXT, UNCOND, w)
    trajectory = sampler.invert(denoiser, X0, SCHEDULE, None, to_level=S)
    start = trajectory.at(SCHEDULE.timesteps[S])
    plain = sampler.sample(denoiser, start, SCHEDULE, None, start_level=S)
    embeds, evals = optimize_null_text(eps_fn, trajectory, SCHEDULE, S, TEXT, UNCOND, torch.full((2,), w), 20)
    assert embeds.shape == (N - S, 2, 16, 16)

    def null_denoiser(x, t, cond):
        e_u, e_t = eps_fn(x, t, cond), eps_fn(x, t, TEXT)
        return e_u + w * (e_t - e_u)

    step = {t: i for i, t in enumerate(SCHEDULE.timesteps)}
    tuned = sampler.sample(null_denoiser, start, SCHEDULE, None, start_level=S,
                           cond_at=lambda i: embeds[i - S].to(torch.float64))
    plain_err, tuned_err = float(((plain - X0) ** 2).mean()), float(((tuned - X0) ** 2).mean())
    print(f"guided w={w}: ddim MSE {plain_err:.3e}, null-text:20 MSE {tuned_err:.3e}, {evals} evaluations")
    assert tuned_err < plain_err / 2
    assert step  # (schedule sanity)


def test_method_names_parse_and_refuse_clearly():
    assert str(parse_method("fixed-point:3")) == "fixed-point:3"
    assert parse_method("null-text:10").param == 10
    for bad in ("fixed-point", "null-text:0", "ddim:2", "magic"):
        with pytest.raises(ValueError):
            parse_method(bad)


@pytest.fixture(scope="module")
def engine(tiny_model_path) -> EditEngine:
    return EditEngine.from_pretrained(str(tiny_model_path), size=64)


def _latent_errors(engine: EditEngine, method: str) -> tuple[float, list]:
    rows = [EditRow(test_image(i), "a cat", "a dog", num_steps=10, start_step=2, inversion=method, seed=i)
            for i in range(2)]
    outs = engine.edit(rows, measure_fidelity=True)
    return float(np.mean([o.latent_mse for o in outs])), outs


def test_methods_on_the_tiny_model_order_and_cost(engine):
    errors, costs = {}, {}
    for method in ("ddim", "negative-prompt", "fixed-point:1", "fixed-point:3", "null-text:5", "noise"):
        errors[method], outs = _latent_errors(engine, method)
        costs[method] = outs[0].inversion_passes
        assert outs[0].reconstruction is not None and outs[0].psnr is not None and 0 < outs[0].ssim <= 1
    print("tiny model latent MSE:", {k: round(v, 5) for k, v in errors.items()}, "inversion passes:", costs)
    assert errors["fixed-point:3"] < errors["fixed-point:1"] < errors["ddim"]
    assert errors["null-text:5"] < errors["ddim"]
    assert errors["noise"] > errors["ddim"]
    n_s = 10 - 2
    assert costs["ddim"] == costs["negative-prompt"] == n_s
    assert costs["fixed-point:1"] == 2 * n_s and costs["fixed-point:3"] == 4 * n_s
    assert costs["noise"] == 0
    assert costs["null-text:5"] <= n_s + n_s * (5 + 2)


def test_cached_null_text_embeddings_are_reused(engine):
    rows = [EditRow(test_image(3), "a cat", "a dog", num_steps=8, start_step=2, inversion="null-text:3")]
    [first] = engine.edit(rows)
    assert "null_s" + str(engine.schedule(8).timesteps[2]) in first.trajectory.extras
    from ddim_worker.core.trajectory_codec import decode_trajectory, encode_trajectory_blob

    stored = decode_trajectory(encode_trajectory_blob(first.trajectory))  # through the cache's own format
    [again] = engine.edit([EditRow(test_image(3), "a cat", "a bird", num_steps=8, start_step=2,
                                   inversion="null-text:3", cached=stored)])
    assert again.cache_hit and again.inversion_passes == 0  # no optimisation, no inversion
    [same] = engine.edit([EditRow(test_image(3), "a cat", "a dog", num_steps=8, start_step=2,
                                  inversion="null-text:3", cached=stored)])
    np.testing.assert_array_equal(same.image, first.image)
