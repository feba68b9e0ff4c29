"""One inversion per image saves UNet work, guidance costs only where it is used, and bytes stay reproducible."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ddim_worker.core.engine import EditEngine, EditRow
from tests.jobkit import picture, run, write_manifest

N, S, B = 6, 2, 4  # steps, start step, engine batch size


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=B)


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def _samples(engine: EditEngine, rows: list[EditRow]) -> tuple[int, list]:
    before = engine.guided_unet.samples
    outs = engine.edit(rows)
    return engine.guided_unet.samples - before, outs


def test_shared_inversions_fill_calls_of_their_own(engine):
    """8 rows, 2 images x 4 edit prompts: 2 inversions in one call (padded to 4), 8 edits in two full calls."""
    rows = [EditRow(_image(i), "a cat", f"a dog {k}", num_steps=N, start_step=S) for i in range(2) for k in range(4)]
    samples, outs = _samples(engine, rows)
    assert sum(o.inversion_passes > 0 for o in outs) == 2
    assert samples == (1 + 2) * 2 * B * (N - S)  # 3 calls, CFG-doubled, n - s steps each
    distinct = [EditRow(_image(10 + i), "a cat", "a dog", num_steps=N, start_step=S) for i in range(8)]
    samples_distinct, _ = _samples(engine, distinct)
    assert samples_distinct == (2 + 2) * 2 * B * (N - S)
    assert samples_distinct / samples == pytest.approx(4 / 3)


def test_unguided_calls_run_the_unet_once(engine):
    rows = [EditRow(_image(20 + i), "a cat", "a dog", num_steps=N, start_step=S, guidance_scale=1.0,
                    inversion_guidance=1.0) for i in range(B)]
    samples, _ = _samples(engine, rows)
    assert samples == 2 * B * (N - S)  # one inversion call and one sampling call, neither doubled
    assert set(engine.guided_unet.call_sizes) >= {B}


def test_a_rows_bytes_do_not_depend_on_its_neighbours(engine):
    """The default mode: alone, with other images, with guided and unguided neighbours, sharing an inversion."""
    row = EditRow(_image(30), "a cat", "a dog", num_steps=N, start_step=S, seed=3)
    alone = engine.edit([row])[0].image
    neighbours = [
        [EditRow(_image(31 + k), "a cat", "a bird", num_steps=N, start_step=S) for k in range(5)] + [row],
        [EditRow(_image(40), "x", "y", num_steps=N, start_step=S, guidance_scale=1.0), row],
        [EditRow(_image(30), "a cat", f"a fox {k}", num_steps=N, start_step=S) for k in range(3)] + [row],
    ]
    for rows in neighbours:
        np.testing.assert_array_equal(engine.edit(rows)[-1].image, alone)


@pytest.mark.parametrize("images,edits", [(8, 4), (32, 1)])
def test_the_job_reports_unet_samples_next_to_the_ideal(tiny_model_path, tmp_path, images, edits):
    for i in range(images):
        (tmp_path / f"p{i}.png").write_bytes(picture(700 + i))
    rows = [{"id": f"r{i}-{k}", "image_url": f"p{i}.png", "source_prompt": "a cat", "edit_prompt": f"a dog {k}"}
            for i in range(images) for k in range(edits)]
    summary = run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path,
                  report=False)
    ideal = images * (6 - 2) * 2 + images * edits * (6 - 2) * 2
    assert summary["ideal_unet_samples"] == ideal and summary["inversions"] == images
    one_partial_call = 2 * 4 * (6 - 2)
    assert ideal <= summary["unet_samples"] <= 1.1 * ideal + one_partial_call, summary
    assert json.loads((tmp_path / "out" / "job.json").read_text())["unet_samples"] == summary["unet_samples"]


def test_ddim_and_direct_rows_of_one_image_share_one_inversion_in_a_job(tiny_model_path, tmp_path):
    """ddim and direct invert alike: one inversion key, so the job sorts an image's rows of both methods together
    (the manifest lists them apart), they meet in one engine batch of 2 rows and are inverted once there: no row is a
    latent-cache (or actor-memory) hit, and job.json counts one inversion per image."""
    from ddim_worker.job.source import inversion_order
    from ddim_worker.core.settings import DEFAULTS

    images = 4
    for i in range(images):
        (tmp_path / f"p{i}.png").write_bytes(picture(800 + i))
    rows = [{"id": f"r{i}-{method}", "image_url": f"p{i}.png", "source_prompt": "a cat", "edit_prompt": "a dog",
             "inversion": method} for method in ("ddim", "direct") for i in range(images)]
    assert inversion_order({**DEFAULTS.as_dict(), **rows[0]}, None) == \
        inversion_order({**DEFAULTS.as_dict(), **rows[images]}, None)
    summary = run(write_manifest(rows, str(tmp_path / "m.parquet")), str(tmp_path / "out"), tiny_model_path,
                  report=False, batch_size=2, calls_per_task=1)
    job = json.loads((tmp_path / "out" / "job.json").read_text())
    assert summary["computed"] == 2 * images and job["inversions"] == images, job
    from tests.jobkit import result_rows

    assert not any(r["cache_hit"] for r in result_rows(str(tmp_path / "out")))
