"""Candidates per row and the CLIP filter: the draws, one inversion and one source branch per image, the scorer's
columns, the ``filtered`` status and what reaches the dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddim_worker.core.candidate_edits import combine, expand
from ddim_worker.core.candidates import Scores, Thresholds, candidate_settings, select
from ddim_worker.core.engine import EditEngine, EditRow
from ddim_worker.core.settings import EditSettings, SettingError
from ddim_worker.shapes import scenes as S

N, START = 10, 4  # steps and start step: small, the accounting holds at any size


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from ddim_worker.shapes.model import make_shapes_model

    return make_shapes_model(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    from ddim_worker.tiny_model import make_scorer

    return make_scorer(tmp_path_factory.mktemp("scorer") / "clip")


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(23)
    return [S.random_scene(rng, renderer="pil") for _ in range(4)]


def _recolour(scene) -> str:
    return scene.with_(colour="blue" if scene.colour != "blue" else "red").caption


def test_draws_are_seeded_from_the_row_and_stay_in_their_ranges():
    settings = EditSettings(candidates=8, sample_cross_replace="0.2:0.6", sample_self_replace="0.5:0.5")
    drawn = candidate_settings(settings, "row-a")
    assert drawn == candidate_settings(settings, "row-a")  # a rerun draws the same
    assert [c.cross_replace for c in drawn] != [c.cross_replace for c in candidate_settings(settings, "row-b")]
    assert all(0.2 <= c.cross_replace <= 0.6 and c.self_replace == 0.5 for c in drawn)
    assert all((c.candidates, c.sample_cross_replace, c.seed) == (1, "", 0) for c in drawn)
    assert len({c.cross_replace for c in drawn}) == 8
    noisy = candidate_settings(settings.replace(eta=0.5, seed=7), "row-a")  # eta > 0: each its own noise
    assert [c.seed for c in noisy] == list(range(7, 15))
    plain = candidate_settings(EditSettings(candidates=2, cross_replace=0.8), "row-a")
    assert [(c.cross_replace, c.candidates) for c in plain] == [(0.8, 1), (0.8, 1)]
    with pytest.raises(SettingError, match="sample_self_replace must be A:B"):
        EditSettings(sample_self_replace="0.3")
    assert EditSettings(sample_cross_replace=" 0.10:0.9").sample_cross_replace == "0.1:0.9"


def test_the_best_passing_candidate_is_selected():
    limits = Thresholds(direction=0.2, image_similarity=0.7, text_similarity=0.2)
    scores = [Scores(0.5, 0.6, 0.3), Scores(0.3, 0.8, 0.3), Scores(0.25, 0.9, 0.3), Scores(0.1, 0.9, 0.9)]
    assert select(scores, limits) == (1, True)  # the highest direction among those that pass (0 fails image)
    assert select(scores[:1] + scores[3:], limits) == (0, False)  # none passes: the best of all, filtered
    assert select([Scores(0.3, 0.8, 0.3)] * 2, limits) == (0, True)  # ties: the first


def test_candidates_share_one_inversion_and_one_source_branch(shapes_model, scenes):
    """K candidates of a row: one inversion, one source branch, K edit branches; their control differs."""
    engine = EditEngine.from_pretrained(str(shapes_model), size=64)  # no padding: the samples are the work itself
    row = EditRow(S.render(scenes[0]), scenes[0].caption, _recolour(scenes[0]), num_steps=N, start_step=START,
                  inversion_guidance=1.0, candidates=3, sample_cross_replace="0.1:1", self_replace=0.4)
    rows = expand(row, "r-1")
    assert len(rows) == 3 and len({r.cross_replace for r in rows}) == 3
    before = engine.guided_unet.samples
    outs = engine.edit(rows)
    steps = N - START
    assert engine.guided_unet.samples - before == steps + 3 * steps * 2 + steps * 2  # inversion, 3 edits, 1 source
    assert len({o.image.tobytes() for o in outs}) > 1  # other fractions, other edits
    scores = [Scores(0.1, 0.9, 0.3), Scores(0.4, 0.9, 0.3), Scores(0.3, 0.9, 0.3)]
    result = combine(rows, outs, scores, Thresholds())
    assert (result.candidate, result.passed, result.scores) == (1, True, scores[1])
    assert result.image.tobytes() == outs[1].image.tobytes() and result.cross_replace == rows[1].cross_replace
    assert (result.inversion_passes, result.source_passes, result.sampling_passes) == (steps, steps, 3 * steps)
    assert expand(EditRow(row.image, row.source_prompt, row.edit_prompt), "r-1")[0].candidates == 1


@pytest.mark.usefixtures("ray_session")
def test_the_job_keeps_the_best_candidate_and_filters_rows_none_passes(shapes_model, scorer, scenes, tmp_path):
    """Through the Ray job: each row's candidates are scored, the best is the row's result with its scores in the
    results, the PNG and the dataset; thresholds no candidate reaches end a row ``filtered``: in the results with
    its scores, counted in job.json and on the card, not in the dataset, and not edited again by a rerun. With
    ``--keep-candidates`` every candidate is written under its own id and listed in the results."""
    import datasets

    from ddim_worker.core.images import encode_png, read_png_text
    from tests.jobkit import png_path, results, run, write_manifest

    rows = []
    for i, sc in enumerate(scenes):
        (tmp_path / f"s{i}.png").write_bytes(encode_png(S.render(sc)))
        rows.append({"id": f"s{i}", "image_url": f"s{i}.png", "source_prompt": sc.caption,
                     "edit_prompt": _recolour(sc)})
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    options = dict(num_steps=N, start_step=START, inversion_guidance=1.0, self_replace=0.4, candidates=3,
                   sample_cross_replace="0.1:1", scorer=str(scorer), report=False)
    out = tmp_path / "out"
    summary = run(manifest, str(out), shapes_model, min_direction=-1, min_image_similarity=-1,
                  min_text_similarity=-1, **options)
    steps = N - START
    assert summary["counts"] == {"ok": 4, "filtered": 0, "failed": 0, "skipped": 0}
    assert summary["inversions"] == 4  # one per image, whatever K
    assert summary["unet_samples"] == summary["ideal_unet_samples"] == 4 * (steps + (3 + 1) * steps * 2)
    assert summary["scorer"]["fingerprint"] and summary["scorer"]["thresholds"]["direction"] == -1
    table = results(str(out))
    for rid, row in table.items():
        assert row["status"] == "ok" and row["candidates"] == 3 and row["candidate"] in (0, 1, 2)
        assert 0.1 <= row["candidate_cross_replace"] <= 1 and row["candidate_self_replace"] == 0.4
        assert all(-1 <= row[c] <= 1 for c in ("score", "clip_image_similarity", "clip_text_similarity"))
        text = read_png_text(png_path(out, rid).read_bytes())
        assert f"candidate={row['candidate']} cross_replace={row['candidate_cross_replace']}" \
            in text["ddim_edit:candidate"]
        assert text["ddim_edit:scores"].startswith(f"score={row['score']:.4f}") and text["ddim_edit:status"] == "ok"
        assert row["all_candidates"] is None
    assert not (out / "candidates").exists()  # without --keep-candidates only the chosen one is written
    packed = datasets.load_dataset(str(out / "dataset"), split="train")
    assert packed.num_rows == 4 and {"score", "candidate", "clip_text_similarity"} <= set(packed.column_names)

    # thresholds between the rows' scores: the rows below end filtered (the same draws, the same edits)
    scores = sorted(r["score"] for r in table.values())
    assert scores[0] < scores[-1]
    cut = (scores[0] + scores[1]) / 2
    out2 = tmp_path / "out2"
    options["keep_candidates"] = True
    summary = run(manifest, str(out2), shapes_model, min_direction=cut, min_image_similarity=-1,
                  min_text_similarity=-1, **options)
    assert summary["counts"]["ok"] == 3 and summary["counts"]["filtered"] == 1 and summary["computed"] == 4
    filtered = [r for r in results(str(out2)).values() if r["status"] == "filtered"]
    assert len(filtered) == 1 and filtered[0]["score"] == scores[0] and filtered[0]["error_code"] is None
    for rid, row in results(str(out2)).items():  # --keep-candidates: all three, each a PNG of its own id
        kept = row["all_candidates"]
        assert [c["candidate"] for c in kept] == [0, 1, 2] and [c["id"] for c in kept] == [f"{rid}.c{k}" for k in
                                                                                            range(3)]
        chosen = kept[row["candidate"]]
        assert (chosen["score"], chosen["cross_replace"]) == (row["score"], row["candidate_cross_replace"])
        assert max(c["score"] for c in kept) == row["score"] and all(c["self_replace"] == 0.4 for c in kept)
        assert [c["passed"] for c in kept] == [c["score"] >= cut for c in kept]
        for c in kept:
            png = Path(c["uri"]).read_bytes()
            assert Path(c["uri"]).parent.parent.name == "candidates"
            assert f"candidate={c['candidate']} " in read_png_text(png)["ddim_edit:candidate"]
            assert read_png_text(png)["ddim_edit:status"] == ("ok" if c["passed"] else "filtered")
        assert np.array_equal(np.asarray(Image.open(kept[row["candidate"]]["uri"])),
                              np.asarray(Image.open(png_path(out2, rid))))  # the row's image is its chosen one
    text = read_png_text(png_path(out2, filtered[0]["id"]).read_bytes())
    assert text["ddim_edit:status"] == "filtered"
    packed = datasets.load_dataset(str(out2 / "dataset"), split="train")
    assert sorted(packed["id"]) == sorted(r["id"] for r in results(str(out2)).values() if r["status"] == "ok")
    card = (out2 / "dataset" / "README.md").read_text()
    assert "1 filtered" in card and f"directional similarity >= {cut}" in card
    again = run(manifest, str(out2), shapes_model, min_direction=cut, min_image_similarity=-1,
                min_text_similarity=-1, **options)
    assert again["computed"] == 0 and again["done_before"] == 4 and again["counts"]["filtered"] == 1


@pytest.mark.usefixtures("ray_session")
def test_candidates_need_a_scorer_and_a_scorer_must_load(shapes_model, scorer, tmp_path):
    """``--candidates`` without ``--scorer`` is refused before anything runs; a per-row ``candidates`` column
    without a scorer fails its row (bad_setting); a scorer folder that is not CLIP ends the job with one line."""
    from ddim_worker.core.images import encode_png
    from ddim_worker.job.driver import JobError
    from tests.jobkit import results, run, write_manifest

    (tmp_path / "a.png").write_bytes(encode_png(S.render(S.random_scene(np.random.default_rng(1), renderer="pil"))))
    rows = [{"id": "one", "image_url": "a.png", "source_prompt": "a red circle", "edit_prompt": "a blue circle",
             "candidates": None},
            {"id": "two", "image_url": "a.png", "source_prompt": "a red circle", "edit_prompt": "a blue circle",
             "candidates": 2}]
    manifest = write_manifest(rows, str(tmp_path / "m.parquet"))
    with pytest.raises(SettingError, match="candidates is 3: choosing among candidates needs a scorer"):
        run(manifest, str(tmp_path / "o1"), shapes_model, candidates=3)
    with pytest.raises(JobError, match="--scorer: .* not a transformers CLIP folder"):
        run(manifest, str(tmp_path / "o2"), shapes_model, scorer=str(tmp_path))
    with pytest.raises(JobError, match="is a 'clip_text_model' model, not CLIP"):
        run(manifest, str(tmp_path / "o3"), shapes_model, scorer=str(shapes_model / "text_encoder"))
    summary = run(manifest, str(tmp_path / "o4"), shapes_model, num_steps=N, start_step=START, report=False)
    table = results(str(tmp_path / "o4"))
    assert summary["counts"]["ok"] == 1 and table["one"]["score"] is None and table["one"]["candidate"] == 0
    assert (table["two"]["status"], table["two"]["error_code"]) == ("failed", "bad_setting")
    assert "needs a scorer" in table["two"]["error"]
    assert json.loads((tmp_path / "o4" / "job.json").read_text())["scorer"] is None


def test_the_shipped_shapes_scorer_passes_edits_that_worked_and_drops_the_others(tmp_path):
    """``make-shapes-scorer``'s CLIP at InstructPix2Pix's thresholds, on held-out scenes drawn as the target: a
    recolour, reshape or new background that worked passes; an unchanged picture, a wrong colour and a background
    edit that grew the shape do not."""
    from ddim_worker.core.scorer import ClipScorer
    from ddim_worker.shapes.edit_bench import held_out
    from ddim_worker.shapes.scorer import make_shapes_scorer

    scorer = ClipScorer(str(make_shapes_scorer(tmp_path / "scorer")))
    assert (tmp_path / "scorer" / "train.log").exists() and (tmp_path / "scorer" / "README.md").exists()
    scenes = held_out(16, 8_080)
    limits = Thresholds()

    def passed(edit) -> float:
        pairs = [edit(sc) for sc in scenes]
        scores = scorer.score([S.render(sc) for sc in scenes], [S.render(drawn) for _, drawn in pairs],
                              [sc.caption for sc in scenes], [target.caption for target, _ in pairs])
        return float(np.mean([limits.passes(s) for s in scores]))

    def other(value, pool, k=1):
        return [v for v in pool if v != value][k % (len(pool) - 1)]

    recolour = lambda sc: sc.with_(colour=other(sc.colour, list(S.COLOURS)))  # noqa: E731
    assert passed(lambda sc: (recolour(sc), recolour(sc))) >= 0.8
    assert passed(lambda sc: (sc.with_(shape=other(sc.shape, S.SHAPES)),) * 2) >= 0.8
    new_background = lambda sc: sc.with_(background=other(sc.background, list(S.BACKGROUNDS)))  # noqa: E731
    assert passed(lambda sc: (new_background(sc),) * 2) >= 0.8
    assert passed(lambda sc: (recolour(sc), sc)) <= 0.1  # nothing changed
    assert passed(lambda sc: (recolour(sc), sc.with_(colour=other(sc.colour, list(S.COLOURS), 2)))) <= 0.1
    assert passed(lambda sc: (new_background(sc), new_background(sc).with_(r=min(sc.r * 1.7, 30.0)))) <= 0.1


def test_the_new_settings_join_a_rows_digest_only_when_set():
    """Rows an earlier version finished keep their input digests (a rerun after the upgrade redoes none of them);
    a row given candidates or a range is made from other inputs, so its digest changes."""
    import hashlib

    from ddim_worker.core.settings import DEFAULTS, SETTING_NAMES
    from ddim_worker.manifest import DIGEST_WHEN_SET, input_digest

    values = {"image_url": "a.png", "source_prompt": "s", "edit_prompt": "e", **DEFAULTS.as_dict()}
    before = {"id": "x", "image": "a.png", "source_prompt": "s", "edit_prompt": "e",
              "settings": {n: values[n] for n in SETTING_NAMES if n not in DIGEST_WHEN_SET}}
    recorded = hashlib.sha256(json.dumps(before, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert input_digest("x", values) == recorded
    assert input_digest("x", {**values, "candidates": 4}) != recorded
    assert input_digest("x", {**values, "sample_self_replace": "0.2:1"}) != recorded
