"""Edits that keep what they should, pinned on the shipped shapes model without a GPU: plain edits are the bytes the
engine gave before the call plan, attention control, direct inversion and masks keep their definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ddim_worker.engine import EditEngine, EditRow
from ddim_worker.shapes import scenes as S
from tests.support import plain_reference


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from ddim_worker.shapes.model import make_shapes_model

    return make_shapes_model(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture
def one_thread():
    """Bitwise batch invariance holds per thread count (a job's CPU actor runs torch on the cores it was given)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plain_edits_are_the_bytes_of_the_engine_before_the_call_plan(shapes_model, one_thread):
    """tests/data/plain_edits.json was written by the engine before it planned its calls (same model, rows and
    settings); every plain edit (ddim, guided or not, eta, every inversion method, a stored trajectory's deeper
    start) must still be those bytes, in batch-invariant mode and unbatched."""
    reference = json.loads(plain_reference.REFERENCE.read_text())
    if reference["machine"] != plain_reference.machine():
        pytest.skip(f"the reference bytes were recorded with {reference['machine']}, this machine runs "
                    f"{plain_reference.machine()}: rerun `python -m tests.support.plain_reference --write` on the "
                    "commit before the call plan to compare here")
    now = plain_reference.record(shapes_model)
    for mode in ("fixed_batch", "unbatched"):
        for case, expected in reference[mode].items():
            assert now[mode][case] == expected, (mode, case)
