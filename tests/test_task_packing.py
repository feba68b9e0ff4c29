"""Rows into engine tasks whose calls fill (``job.task_packing``), and the job's UNet samples against the ideal."""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from PIL import Image

from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.core.settings import DEFAULTS
from ddim_worker.job.source import row_inversion_key
from ddim_worker.job.task_packing import FILLER, calls_of, inversion_kind, pack_tasks, padding_of, pending_needs
from ddim_worker.rows import FAILED, PENDING
from tests.jobkit import picture, png_path, run, write_manifest

B, CALLS = 4, 4
TASK = B * CALLS


def _records(images: int, edits: int, **settings) -> list[dict]:
    rows = [{**DEFAULTS.as_dict(), **settings, "id": f"r{i}-{k}", "image_url": f"p{i}.png", "source_prompt": "a cat",
             "edit_prompt": f"a dog {k}", "status": PENDING} for i in range(images) for k in range(edits)]
    return sorted(rows, key=lambda r: row_inversion_key(r, None).sort_text())


def _pack(records: list[dict]) -> list[list[dict]]:
    keys = [row_inversion_key(r, None) if r["status"] == PENDING else None for r in records]
    packed = pack_tasks(records, keys, TASK, B, CALLS, lambda: {"status": FILLER, "id": ""})
    assert len(packed) % TASK == 0
    assert sorted(r["id"] for r in packed if r["status"] != FILLER) == sorted(r["id"] for r in records)
    return [packed[i:i + TASK] for i in range(0, len(packed), TASK)]


def _calls(task: list[dict]) -> int:
    real = [r for r in task if r["status"] == PENDING]
    return calls_of([n for r in real for n in pending_needs(r, row_inversion_key(r, None))], B)


def _images(task: list[dict]) -> set[str]:
    return {r["image_url"] for r in task if r["status"] == PENDING}


def test_controlled_images_of_three_edits_fill_every_call():
    """24 images x 3 edits with control: 4 branches an image (3 edits + its source), so 4 whole images a task fill
    its 4 calls of 4; the 4 rows left are fillers. No image is split between tasks."""
    tasks = _pack(_records(24, 3, cross_replace=0.8, self_replace=0.4))
    assert len(tasks) == 6
    for task in tasks:
        assert sum(r["status"] == PENDING for r in task) == 12 and _calls(task) == CALLS
    seen = [image for task in tasks for image in _images(task)]
    assert len(seen) == len(set(seen)) == 24


def test_a_task_gives_back_an_image_whose_inversion_would_pad_a_call():
    """Plain images of 3 edits, inverted unguided: 5 images fit 4 sampling calls but invert in 2 calls (4 + 1 padded
    to 4); 4 images fill 3 sampling calls and 1 inversion call, so a task takes 4 and nothing is padded."""
    tasks = _pack(_records(24, 3, inversion_guidance=1.0))
    assert [sum(r["status"] == PENDING for r in t) for t in tasks] == [12] * 6
    for task in tasks:
        real = [r for r in task if r["status"] == PENDING]
        needs = [n for r in real for n in pending_needs(r, row_inversion_key(r, None))]
        kinds = [inversion_kind(r) for r in real if r["edit_prompt"].endswith(" 0")]
        assert padding_of(needs, kinds, B) == 0


def test_plain_rows_fill_tasks_without_fillers():
    """No control: a row is one branch, so a task holds 16 rows (whole images of 4) and no filler but at the end."""
    tasks = _pack(_records(10, 4))
    assert [sum(r["status"] == FILLER for r in t) for t in tasks] == [0, 0, 8]
    assert all(_calls(t) <= CALLS for t in tasks)


def test_an_image_larger_than_a_task_is_cut_into_task_sized_pieces():
    """40 controlled edits of one image: pieces of 12 (4 calls of a source and 3 edits) while more rows are left
    than a task holds; the last 16 stay whole (an image whose rows fit a task is never cut)."""
    tasks = _pack(_records(1, 40, cross_replace=0.5))
    assert [sum(r["status"] == PENDING for r in t) for t in tasks] == [12, 12, 16]
    assert [_calls(t) for t in tasks] == [CALLS, CALLS, 6]


def test_an_image_whose_rows_fit_a_task_is_never_cut():
    """One call a task, batch 2: a ddim row and a direct row of one image need 2 calls, but share one inversion
    only in one task, so they stay together."""
    records = [{**r, "inversion": method} for method in ("ddim", "direct") for r in _records(2, 1)]
    records.sort(key=lambda r: row_inversion_key(r, None).sort_text())
    keys = [row_inversion_key(r, None) for r in records]
    packed = pack_tasks(records, keys, 2, 2, 1, lambda: {"status": FILLER, "id": ""})
    assert [{r["image_url"] for r in packed[i:i + 2]} for i in (0, 2)] == [{"p0.png"}, {"p1.png"}]


def test_rows_not_to_edit_go_with_the_rows_to_edit():
    """Rows that failed before their image was read cost nothing: they are not left in a task of their own."""
    failed = [{**r, "id": f"bad{i}", "status": FAILED} for i, r in enumerate(_records(4, 1))]
    tasks = _pack(failed + _records(1, 1))
    assert len(tasks) == 1 and sum(r["status"] == FAILED for r in tasks[0]) == 4


def test_rows_not_to_edit_take_free_rows_and_no_call():
    records = _records(4, 3, cross_replace=0.8)
    failed = [{**r, "id": f"bad{i}", "status": FAILED} for i, r in enumerate(_records(4, 1))]
    tasks = _pack(records + failed)
    assert len(tasks) == 1 and sum(r["status"] == FILLER for r in tasks[0]) == 0 and _calls(tasks[0]) == CALLS


def test_a_72_row_job_with_control_runs_within_3_percent_of_the_ideal(tiny_model_path, tmp_path):
    """24 images x 3 edit prompts, attention control and direct inversion, batch 4: job.json's UNet samples within
    3 % of the ideal, and a row's bytes are those of the same row edited alone (packing changed its neighbours)."""
    for i in range(24):
        (tmp_path / f"p{i}.png").write_bytes(picture(900 + i, size=64))
    rows = [{"id": f"r{i}-{k}", "image_url": f"p{i}.png", "source_prompt": "a cat", "edit_prompt": f"a {k} cat"}
            for i in range(24) for k in ("red", "blue", "small")]
    summary = run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path,
                  report=False, cross_replace=0.8, self_replace=0.4, inversion="direct", calls_per_task=CALLS,
                  num_steps=4, start_step=2)
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job["computed"] == 72 and job["counts"]["ok"] == 72 and job["inversions"] == 24, job
    assert job["ideal_unet_samples"] <= job["unet_samples"] <= 1.03 * job["ideal_unet_samples"], job
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=B)
    image = np.asarray(Image.open(io.BytesIO(picture(905, size=64))).convert("RGB"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the job's CPU actor: bitwise equality needs the same reduction order
    try:
        alone = engine.edit([EditRow(image, "a cat", "a blue cat", num_steps=4, start_step=2, cross_replace=0.8,
                                     self_replace=0.4, inversion="direct")])[0].image
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(np.asarray(Image.open(png_path(tmp_path / "out", "r5-blue"))), alone)
    assert summary["unet_samples"] == job["unet_samples"]


def test_filler_rows_never_reach_the_results(tiny_model_path, tmp_path):
    """Fillers end at the engine actor: the results hold one row per manifest row, no empty id."""
    from tests.jobkit import result_rows

    images = 3
    for i in range(images):
        (tmp_path / f"p{i}.png").write_bytes(picture(950 + i, size=64))
    rows = [{"id": f"f{i}", "image_url": f"p{i}.png", "source_prompt": "a cat", "edit_prompt": "a dog"}
            for i in range(images)]
    run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path, report=False)
    assert sorted(r["id"] for r in result_rows(str(tmp_path / "out"))) == [f"f{i}" for i in range(images)]


def test_the_quick_count_of_plain_rows_is_the_planners():
    """Rows without a source branch: the packer counts their calls without planning them; the count must be the
    engine planner's, guided and unguided rows apart, at every batch size."""
    from ddim_worker.core.call_plan import RowNeeds, plan_sampling

    rng = np.random.default_rng(0)
    for n in range(0, 40):
        members = [RowNeeds(bool(g)) for g in rng.integers(0, 2, n)]
        for batch in (1, 2, 3, 4, 8):
            assert calls_of([("g", m) for m in members], batch) == len(plan_sampling(members, batch))
