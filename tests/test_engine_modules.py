"""The engine's modules: small units (no class over 300 lines, no function over 70), and one UNet call site (the
model adapter's denoiser) that null-text's optimisation goes through too."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.core.group_plan import RowCharges, plan_group
from ddim_worker.core.sampler import Schedule

ENGINE_MODULES = ("engine", "edit_types", "model_adapter", "loops", "group_plan", "group_run", "inversion_steps",
                  "mask_step", "sampling_steps")


@pytest.mark.parametrize("name", ENGINE_MODULES)
def test_engine_modules_have_no_class_over_300_lines_and_no_function_over_70(name):
    path = Path(__file__).parents[1] / "ddim_worker" / "core" / f"{name}.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            limit = 300 if isinstance(node, ast.ClassDef) else 70
            assert node.end_lineno - first + 1 <= limit, f"{name}.{node.name}: {node.end_lineno - first + 1} lines"


class CountingDenoiser:
    """An injected denoiser without a ``conditional`` of its own: the UNet, counted."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.inner(x, t, cond)


def test_null_text_runs_on_the_injected_denoiser(tiny_model_path):
    base = EditEngine.from_pretrained(str(tiny_model_path), size=64)
    counting = CountingDenoiser(base.guided_unet)
    engine = EditEngine(base.pipe, size=64, denoiser=counting)
    image = np.full((64, 64, 3), 120, np.uint8)
    before = base.guided_unet.samples
    [out] = engine.edit([EditRow(image, "a cat", "a dog", num_steps=4, start_step=1, inversion="null-text:2")])
    # every UNet evaluation went through the injected denoiser: the inversion, null-text's and the sampling
    assert counting.calls == out.inversion_passes + out.sampling_passes
    assert base.guided_unet.calls == counting.calls and base.guided_unet.samples > before


def test_the_plan_is_pure_and_charges_each_row():
    """Two edits of one image with direct inversion: one inversion, one source branch, charged to the first row."""
    image = np.full((64, 64, 3), 90, np.uint8)
    rows = [EditRow(image, "a cat", prompt, num_steps=4, start_step=1, inversion="direct") for prompt in ("a dog",
                                                                                                        "a fox")]
    schedule = Schedule((750, 500, 250, 0), torch.linspace(0.1, 1.0, 5, dtype=torch.float64))
    plan = plan_group(rows, schedule, 1, 0.0, None, [None, None])
    assert plan.shares == ((0, 1),) and [c.rows for c in plan.inversions] == [(0,)] and not plan.riders
    assert [[(b.row, b.is_source) for b in call.branches] for call in plan.sampling] == [[(0, True), (0, False),
                                                                                         (1, False)]]
    assert plan.charges == (RowCharges(inversion=3, source=3), RowCharges())
    assert not plan.null_text and not plan.mask_calls
    [step] = plan.steps  # what the call's rows read, in branch order
    assert step.prompts == ("a cat", "a dog", "a fox") and step.pinned == (0,) and step.corrected == ((1, 0), (2, 0))
    assert step.control is None and not step.masked and not step.null_text
    assert all(p == ("a cat",) * len(p) for p in [s.prompts for s in plan.fidelity])


def test_the_denoiser_runs_each_calls_layout_as_planned(tiny_model_path, monkeypatch):
    """The executor reads every call's padding and doubling from the plan (inversion, mask and sampling calls), not
    the engine's batch size: a plan widened to 6 rows a call runs calls of 6 (12 when doubled), and a plan that says
    unguided for a guided row is refused, not silently doubled."""
    from dataclasses import replace

    from ddim_worker.core import group_run

    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=4)
    planned = group_run.plan_group

    def widened(*args, **kwargs):
        plan = planned(*args, **kwargs)
        return replace(plan, inversions=tuple(replace(c, pad_to=6) for c in plan.inversions),
                       mask_calls=tuple(replace(c, pad_to=6) for c in plan.mask_calls),
                       steps=tuple(replace(s, call=replace(s.call, pad_to=6)) for s in plan.steps))

    monkeypatch.setattr(group_run, "plan_group", widened)
    image = np.full((64, 64, 3), 120, np.uint8)
    sizes = dict(engine.guided_unet.call_sizes)
    engine.edit([EditRow(image, "a cat", "a dog", num_steps=4, start_step=1, mask="auto")])
    ran = {size for size, n in engine.guided_unet.call_sizes.items() if n > sizes.get(size, 0)}
    assert ran == {6, 12}, ran  # unguided mask calls (6), guided inversion and sampling (12)

    def unguided(*args, **kwargs):
        plan = planned(*args, **kwargs)
        return replace(plan, steps=tuple(replace(s, call=replace(s.call, guided=False)) for s in plan.steps))

    monkeypatch.setattr(group_run, "plan_group", unguided)
    with pytest.raises(ValueError, match="planned unguided"):
        engine.edit([EditRow(image, "a cat", "a dog", num_steps=4, start_step=1)])
