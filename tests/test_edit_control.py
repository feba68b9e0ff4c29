"""Edits that keep what they should, pinned on the shipped shapes model without a GPU: plain edits are the bytes the
engine gave before the call plan, attention control, direct inversion and masks keep their definitions."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ddim_worker.core.engine import EditEngine, EditRow
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
    start) must still be those bytes, in batch-invariant mode and unbatched. Bytes hold on the recording machine
    only: elsewhere the latents test below is the check."""
    reference = json.loads(plain_reference.REFERENCE.read_text())
    if reference["machine"] != plain_reference.machine():
        pytest.skip(f"the reference bytes were recorded with {reference['machine']}, this machine runs "
                    f"{plain_reference.machine()}: the recorded latents are compared within a tolerance instead")
    now = plain_reference.record(shapes_model)
    for mode in ("fixed_batch", "unbatched"):
        for case, expected in reference[mode].items():
            assert now[mode][case] == expected, (mode, case)


@pytest.mark.parametrize("batch_size", [plain_reference.BATCH, None], ids=["fixed_batch", "unbatched"])
def test_plain_edits_equal_the_recorded_latents(shapes_model, one_thread, batch_size):
    """tests/data/plain_latents.npz: every plain edit's x0 latent and passes, recorded before the plan/executor split
    (fixed batch). Within ``LATENT_ATOL`` on any machine, in both modes; the same bytes on the recording machine in
    the mode it was recorded in."""
    recorded = dict(np.load(plain_reference.LATENTS))
    same_machine = json.loads(plain_reference.LATENTS_MACHINE.read_text())["machine"] == \
        plain_reference.latent_machine()
    now = plain_reference.record_latents(shapes_model, batch_size)
    assert set(now) == set(recorded)
    for case, expected in recorded.items():
        if case.endswith(":passes"):
            np.testing.assert_array_equal(now[case], expected, err_msg=case)
        elif same_machine and batch_size == plain_reference.BATCH:
            assert np.array_equal(now[case], expected), case
        else:
            np.testing.assert_allclose(now[case], expected, rtol=0, atol=plain_reference.LATENT_ATOL, err_msg=case)


N, START, B = 10, 4, 4  # steps, start step, engine batch size: small, the definitions hold at any size


@pytest.fixture(scope="module")
def engine(shapes_model):
    return EditEngine.from_pretrained(str(shapes_model), size=64, batch_size=B)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(11)
    return [S.random_scene(rng, renderer="pil") for _ in range(4)]


def _row(scene, edit_prompt: str | None = None, **settings) -> EditRow:
    return EditRow(S.render(scene), scene.caption, edit_prompt or scene.with_(colour="blue" if scene.colour != "blue"
                                                                              else "red").caption,
                   num_steps=N, start_step=START, inversion_guidance=1.0, **settings)


def test_control_that_replaces_no_step_is_the_plain_edit_byte_for_byte(engine, scenes, one_thread):
    """Fractions that cover no sampled step (0.1 of 6 steps): a source branch is sampled beside the edit and every
    attention layer runs the control processors, yet the edit is the plain edit's bytes."""
    plain = engine.edit([_row(sc) for sc in scenes[:2]])
    idle = engine.edit([_row(sc, cross_replace=0.1, self_replace=0.1, edit_word_weight=3.0) for sc in scenes[:2]])
    for p, c in zip(plain, idle):
        assert np.array_equal(p.image, c.image) and c.source_passes == N - START and c.attention_control == "word-swap"


def test_full_replacement_with_the_source_prompt_is_the_source_branch(engine, scenes, one_thread):
    """Edit prompt = source prompt, every map replaced: each edit reads its own image's source branch (two images in
    one call), so it is that branch, i.e. the plain resample with the source prompt."""
    same = [_row(sc, sc.caption) for sc in scenes[:2]]
    reference = engine.edit(same)
    controlled = engine.edit([_row(sc, sc.caption, cross_replace=1.0, self_replace=1.0) for sc in scenes[:2]])
    for r, c in zip(reference, controlled):
        assert np.array_equal(r.image, c.image)
    # and a real edit under full replacement is not the source: the edit words still act through their values
    edited = engine.edit([_row(scenes[0], cross_replace=1.0, self_replace=1.0)])[0]
    assert not np.array_equal(edited.image, reference[0].image)


def test_direct_inversion_with_the_source_prompt_gives_back_the_encoded_input(engine, scenes, one_thread):
    """The source branch is held on the trajectory and the edit gains its corrections: with the source prompt as the
    edit prompt the edit follows the trajectory to x0, the input's own latent (the VAE's reconstruction)."""
    rows = [_row(sc, sc.caption, inversion="direct") for sc in scenes[:2]]
    outs = engine.edit(rows)
    vae = engine.decode(engine.encode_images(engine.preprocess([r.image for r in rows])))
    for o, v in zip(outs, vae):
        assert np.abs(o.image.astype(int) - v.astype(int)).max() <= 1
    plain = engine.edit([_row(sc, sc.caption) for sc in scenes[:2]])  # plain DDIM drifts
    assert all(np.abs(p.image.astype(int) - v.astype(int)).max() > 8 for p, v in zip(plain, vae))


def test_pnp_corrects_only_the_source_branch(engine, scenes, one_thread):
    """PnP Inversion as published: the source branch is held on the trajectory, the edit is not corrected. Without
    control a pnp edit reads nothing of a source: the plain ddim edit's bytes, and no source branch sampled. With
    control it reads the held source: neither the plain controlled edit nor the add-source one (``direct``). A pnp
    and a direct edit of one image share one source branch and keep their own bytes."""
    plain = engine.edit([_row(sc) for sc in scenes[:2]])
    pnp = engine.edit([_row(sc, inversion="pnp") for sc in scenes[:2]])
    for p, q in zip(plain, pnp):
        assert np.array_equal(p.image, q.image) and q.source_passes == 0
    control = dict(cross_replace=0.8, self_replace=0.4)
    plain_c, pnp_c, direct_c = (engine.edit([_row(scenes[0], inversion=m, **control)])[0]
                                for m in ("ddim", "pnp", "direct"))
    assert not np.array_equal(pnp_c.image, plain_c.image) and not np.array_equal(pnp_c.image, direct_c.image)
    both = engine.edit([_row(scenes[0], inversion="pnp", **control), _row(scenes[0], inversion="direct", **control)])
    assert [o.source_passes for o in both] == [N - START, 0]  # one source branch for the image, charged once
    assert np.array_equal(both[0].image, pnp_c.image) and np.array_equal(both[1].image, direct_c.image)


def test_rows_with_and_without_control_in_one_call_get_their_own_bytes(engine, scenes, one_thread):
    rows = [_row(scenes[0]), _row(scenes[1], cross_replace=0.8, self_replace=0.5),
            _row(scenes[1], scenes[1].with_(colour="yellow").caption, cross_replace=1.0, self_replace=0.4,
                 edit_word_weight=2.0),
            _row(scenes[2], inversion="direct", cross_replace=0.5), _row(scenes[3], guidance_scale=1.0)]
    together = engine.edit(rows)
    for row, out in zip(rows, together):
        [alone] = engine.edit([row])
        assert np.array_equal(alone.image, out.image)
    assert [o.source_passes for o in together] == [0, N - START, 0, N - START, 0]  # one source branch per image


def test_an_image_with_several_edit_prompts_costs_one_inversion_and_one_source_branch(shapes_model, scenes):
    engine = EditEngine.from_pretrained(str(shapes_model), size=64)  # no padding: the samples are the work itself
    colours = [c for c in ("red", "blue", "yellow", "purple") if c != scenes[0].colour][:3]
    rows = [_row(scenes[0], scenes[0].with_(colour=c).caption, cross_replace=0.8, self_replace=0.4,
                 inversion="direct") for c in colours]
    before = engine.guided_unet.samples
    outs = engine.edit(rows)
    assert [o.inversion_passes for o in outs] == [N - START, 0, 0]
    assert [o.source_passes for o in outs] == [N - START, 0, 0]
    ideal = (N - START) * 1 + 3 * (N - START) * 2 + (N - START) * 2  # inversion unguided; 3 edits + 1 source, guided
    assert engine.guided_unet.samples - before == ideal


def test_an_image_whose_rows_fall_in_several_groups_is_inverted_once(engine, scenes, one_thread):
    """A masked row samples deeper and eta is a group's own, so one image's rows can fall in three sampling groups;
    the deepest group inverts the image and lends its trajectory to the others (shared, not a cache hit), which
    edit to the bytes they get alone."""
    from ddim_worker.core.settings import sampling_start

    rows = [_row(scenes[1]), _row(scenes[1], mask="auto"), _row(scenes[1], eta=0.5, seed=3)]
    together = engine.edit(rows)
    assert [o.inversion_passes for o in together] == [0, N - sampling_start(START), 0]
    assert [(o.shared_inversion, o.cache_hit) for o in together] == [(True, False), (False, False), (True, False)]
    for row, out in zip(rows, together):
        alone = engine.edit([row])[0]
        assert np.array_equal(alone.image, out.image) and alone.inversion_passes > 0


def test_refinement_is_chosen_when_the_prompts_tokenise_to_different_lengths(engine, scenes):
    [swap, refine] = engine.edit([_row(scenes[0], cross_replace=0.8),
                                  _row(scenes[0], scenes[0].with_(colour="green").caption, cross_replace=0.8)])
    assert (swap.attention_control, refine.attention_control) == ("word-swap", "refine")
    [weighted] = engine.edit([_row(scenes[0], scenes[0].with_(colour="green").caption, cross_replace=0.8,
                                   edit_word_weight=3.0)])
    assert not np.array_equal(weighted.image, refine.image)  # the new words' weight acts while maps are replaced


def test_a_masked_background_edit_keeps_the_shape_to_the_pixel(engine):
    """mask auto: the mask is the background (the region the edit prompt changes, with the image's own edges), the
    pixels outside it (less a 1 px band along its edge) are the input's, and its cost is counted: DRAWS predictions
    per edit and per image."""
    rng = np.random.default_rng(3)
    scenes = [S.random_scene(rng, renderer="pil", r_range=(12.0, 20.0)) for _ in range(3)]
    rows = [_row(sc, sc.with_(background=[b for b in S.BACKGROUNDS if b != sc.background][0]).caption, mask="auto")
            for sc in scenes] + [_row(scenes[0], mask="auto")]  # the first image also gets a colour edit
    outs = engine.edit(rows)
    from ddim_worker.core import masks

    ious = []
    for row, out, sc in zip(rows, outs, scenes):
        mask = out.mask > 0
        assert out.mask.shape == (64, 64) and out.mask.dtype == np.uint8 and set(np.unique(out.mask)) <= {0, 255}
        kept = ~masks.grow(mask, masks.PASTE_MARGIN)  # the mask's outline band comes from the edit
        assert kept.sum() > 0.5 * (~mask).sum() and np.array_equal(out.image[kept], row.image[kept])  # the input's
        truth = ~S.mask(sc)
        ious.append((mask & truth).sum() / (mask | truth).sum())
    assert np.mean(ious) > 0.85, ious
    colour = outs[3].mask > 0
    assert (colour & S.mask(scenes[0])).sum() > 0.6 * S.mask(scenes[0]).sum() and colour.mean() < 0.5
    assert [o.mask_passes for o in outs] == [2 * masks.DRAWS, 2 * masks.DRAWS, 2 * masks.DRAWS, masks.DRAWS]
    assert all(o.sampling_passes == N - masks.sampling_start(START) for o in outs)


def test_masks_need_a_trajectory_and_settings_are_checked_by_the_one_validator():
    from ddim_worker.core.settings import EditSettings, SettingError

    with pytest.raises(SettingError, match="mask auto blends back to the inverted trajectory"):
        EditSettings(mask="auto", inversion="noise")
    for bad, match in [({"cross_replace": 1.5}, r"cross_replace must be in \[0, 1\]"),
                       ({"mask": "yes"}, "mask must be one of none, auto"),
                       ({"edit_word_weight": -1}, "edit_word_weight must be in")]:
        with pytest.raises(SettingError, match=match):
            EditSettings(**bad)


def test_direct_shares_ddims_cached_trajectory_and_ids_stay_stable():
    from ddim_worker.core.inversion import parse_method
    from ddim_worker.manifest import row_id
    from ddim_worker.outputs import OutputLayout
    from ddim_worker.job.stages import StageContext, cache_key

    assert parse_method("direct").cache_key(3.5) == parse_method("ddim").cache_key(3.5) == "ddim"
    assert parse_method("pnp").cache_key(3.5) == "ddim"
    ctx = StageContext(OutputLayout("out"), None, "m", "fingerprint", "float32", 64)
    pixels = np.zeros((64, 64, 3), np.uint8)
    plain = {"inversion": "ddim", "guidance_scale": 3.5, "source_prompt": "a", "negative_prompt": "",
             "num_steps": 50, "inversion_guidance": 1.0}
    keys = {cache_key(ctx, pixels, {**plain, **change}) for change in (
        {}, {"inversion": "direct"}, {"cross_replace": 0.8, "self_replace": 1.0, "edit_word_weight": 2.0},
        {"mask": "auto"})}
    assert len(keys) == 1  # none of the new settings changes the latent-cache key
    base = {"image_url": "a.png", "source_prompt": "a", "edit_prompt": "b", "num_steps": 50, "start_step": 10,
            "guidance_scale": 3.5, "inversion_guidance": 3.5, "seed": 0, "inversion": "ddim", "negative_prompt": ""}
    old = row_id(base)  # a row of a manifest without the new columns
    assert row_id({**base, "cross_replace": None, "mask": None}) == old
    assert row_id({**base, "cross_replace": 0.8}) != old and row_id({**base, "mask": "auto"}) != old


def test_control_flags_alone_take_the_recommended_values():
    from ddim_worker.job.args import parse_args
    from ddim_worker.core.settings import CONTROL_WHEN_NAMED

    config = parse_args(["m.parquet", "--output", "o", "--cross-replace", "--self-replace", "--mask",
                         "--inversion", "direct"])
    assert (config.edit.cross_replace, config.edit.self_replace) == (CONTROL_WHEN_NAMED["cross_replace"],
                                                                     CONTROL_WHEN_NAMED["self_replace"])
    assert (config.edit.mask, config.edit.inversion) == ("auto", "direct")
    config = parse_args(["m.parquet", "--output", "o", "--cross-replace", "0.5", "--self-replace", "0.25"])
    assert (config.edit.cross_replace, config.edit.self_replace, config.edit.mask) == (0.5, 0.25, "none")


@pytest.mark.usefixtures("ray_session")
def test_the_job_records_control_and_masks_everywhere(shapes_model, tmp_path):
    """Through the Ray job: flags and per-row columns reach the engine; results, PNG metadata and job.json record
    the settings; masks are written beside the images; an image with three edit prompts costs one inversion and one
    source branch, so job.json's UNet samples are the ideal."""
    from ddim_worker.core.images import read_png_text
    from tests.jobkit import png_path, results, run, write_manifest

    rng = np.random.default_rng(5)
    scenes = [S.random_scene(rng, renderer="pil") for _ in range(4)]
    rows = []
    for i, sc in enumerate(scenes):
        (tmp_path / f"s{i}.png").write_bytes(__import__("ddim_worker.core.images", fromlist=["x"]).encode_png(
            S.render(sc)))
        others = [c for c in S.COLOURS if c != sc.colour][:3]
        rows += [{"id": f"s{i}-{c}", "image_url": f"s{i}.png", "source_prompt": sc.caption,
                  "edit_prompt": sc.with_(colour=c).caption} for c in others]
    rows[0]["self_replace"] = 0.25  # a per-row column beats the job's flag
    out = tmp_path / "out"
    summary = run(write_manifest(rows, str(tmp_path / "m.parquet")), str(out), shapes_model, report=False,
                  num_steps=N, start_step=START, inversion_guidance=1.0, cross_replace=0.8, self_replace=0.5,
                  inversion="direct")
    assert summary["counts"]["ok"] == 12 and summary["inversions"] == 4
    assert summary["unet_samples"] == summary["ideal_unet_samples"] == 4 * (N - START) + 4 * 4 * (N - START) * 2
    table = results(str(out))
    first = table["s0-" + [c for c in S.COLOURS if c != scenes[0].colour][0]]
    assert (first["cross_replace"], first["self_replace"], first["inversion"]) == (0.8, 0.25, "direct")
    assert sum(r["source_passes"] for r in table.values()) == 4 * (N - START)
    assert {r["attention_control"] for r in table.values()} <= {"word-swap", "refine"}
    settings = read_png_text(png_path(out, first["id"]).read_bytes())["ddim_edit:settings"]
    assert "cross_replace=0.8 self_replace=0.25 edit_word_weight=1.0 mask=none" in settings
    record = json.loads((out / "job.json").read_text())["config"]
    assert (record["cross_replace"], record["self_replace"], record["mask"]) == (0.8, 0.5, "none")
    # masks: a second job over the same images, mask auto from the flag, a background edit per image
    rows = [{"id": f"m{i}", "image_url": f"s{i}.png", "source_prompt": sc.caption,
             "edit_prompt": sc.with_(background=[b for b in S.BACKGROUNDS if b != sc.background][0]).caption}
            for i, sc in enumerate(scenes[:2])]
    run(write_manifest(rows, str(tmp_path / "m2.parquet")), str(tmp_path / "out2"), shapes_model, report=False,
        num_steps=N, start_step=START, mask="auto")
    table = results(str(tmp_path / "out2"))
    for rid in ("m0", "m1"):
        assert table[rid]["mask"] == "auto" and table[rid]["mask_uri"] == str(png_path(tmp_path / "out2", rid, "mask"))
        mask = np.asarray(__import__("PIL.Image", fromlist=["x"]).open(table[rid]["mask_uri"]))
        assert mask.shape == (64, 64) and 0 < (mask > 0).mean() < 1
        assert table[rid]["mask_passes"] > 0
    import datasets  # the packed dataset carries each edit's mask beside the edited image

    packed = datasets.load_dataset(str(tmp_path / "out2" / "dataset"), split="train")
    assert packed.num_rows == 2 and packed[0]["edit_mask"].size == (64, 64) and packed[0]["edit_mask"].mode == "L"


def test_the_job_benchmark_judges_the_images_where_the_job_writes_them(tmp_path):
    """``job_bench`` reads each row's PNG and mask through the output layout: an output whose edits are the targets
    themselves succeeds everywhere, one whose edits are the inputs nowhere."""
    from PIL import Image

    from ddim_worker.outputs import OutputLayout
    from ddim_worker.shapes.job_bench import judge_job, write_inputs

    index = write_inputs(tmp_path / "inputs", 3)
    figures = {}
    for name, pick in (("targets", lambda sc, target: target), ("inputs", lambda sc, target: sc)):
        layout = OutputLayout(str(tmp_path / name))
        for rid, (kind, sc, target) in index.items():
            path = layout.image("edited", rid)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(S.render(pick(sc, target))).save(path)
        figures[name] = judge_job(tmp_path / name, tmp_path / "inputs", index)
    assert all(figures["targets"][kind]["success"] == 1.0 for kind in ("colour", "shape", "background"))
    assert all(figures["inputs"][kind]["success"] == 0.0 for kind in ("colour", "shape", "background"))
    assert figures["targets"]["masks_written"] == 0
