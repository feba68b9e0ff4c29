"""Our word swap against google/prompt-to-prompt's controller, from the same latent, on the shapes model.

``tests/data/p2p_reference.npz`` holds the reference's latents for two cases, computed once by
``tests/scripts/p2p_reference_figures.py`` from the reference's code (``.json``: the cases and its commit). Under the
default ``control_rules=reference`` our edit must equal them; under ``every-layer`` (this project's definitions
before) it must not: the ``rounding`` case controls one cross-attention step fewer (12 steps at 0.8: 9, not 10),
the ``layers`` case (256 px: 1024-token layers) replaces self-attention in the largest layers too.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_worker.core.attention_control import cross_steps, self_steps
from ddim_worker.core.engine import EditEngine
from tests.scripts.p2p_reference_figures import CASES, case_rows

DATA = Path(__file__).parent / "data"
#: Our attention runs through the fused SDPA kernel, the reference forms the probabilities (einsum, softmax): the
#: two differ in the last bits, and across CPUs. Measured at recording: 1.5e-6 and 4.6e-6 (134-137 dB PSNR); the
#: other rules: 2.4e-2 and 0.15 (47 and 40 dB).
ATOL = 1e-4


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from ddim_worker.shapes.model import make_shapes_model

    return make_shapes_model(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(DATA / "p2p_reference.npz")), json.loads((DATA / "p2p_reference.json").read_text())


def test_the_reference_rules_turn_fractions_into_steps_as_the_reference_does():
    assert (cross_steps(0.8, 12, "reference"), cross_steps(0.8, 12, "every-layer")) == (10, 9)
    assert (self_steps(0.4, 12, "reference"), self_steps(0.4, 12, "every-layer")) == (4, 4)
    assert cross_steps(1.0, 12, "reference") == 12 and self_steps(1.0, 12, "reference") == 12
    assert (self_steps(0.29, 100, "reference"), self_steps(0.29, 100, "every-layer")) == (28, 29)  # int, not floor+eps
    assert cross_steps(0.0, 30, "reference") == 0 == self_steps(0.0, 30, "reference")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_our_word_swap_is_the_reference_controllers_and_the_other_rules_are_not(shapes_model, recorded, case):
    arrays, meta = recorded
    name, size, steps, cross, self_, seed = case
    assert meta["cases"][name]["num_steps"] == steps and meta["cases"][name]["size"] == size
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = EditEngine.from_pretrained(str(shapes_model), size=size)
        ours = {}
        for rules in ("reference", "every-layer"):
            row, _, _ = case_rows(size, steps, cross, self_, seed, rules)
            out = engine.edit([row])[0]
            np.testing.assert_allclose(out.trajectory.latents[-1][0].numpy(), arrays[f"{name}:x_t"], rtol=0,
                                       atol=ATOL)  # the same start latent as the reference's
            ours[rules] = out.latent.float().numpy()
    finally:
        torch.set_num_threads(threads)
    reference = arrays[f"{name}:reference"][1]
    assert np.abs(ours["reference"] - reference).max() <= ATOL
    assert np.abs(ours["every-layer"] - reference).max() > 10 * ATOL
