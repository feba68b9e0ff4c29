"""The shipped shapes model (ddim_worker/shapes/weights): real edits, measured from pixels with the scenes' masks."""

from __future__ import annotations

import time

import numpy as np
import pytest

from ddim_worker.shapes import scenes as S
from ddim_worker.shapes.edit_bench import colour_edits, held_out, judge

COUNT = 6


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory):
    from ddim_worker.shapes.model import make_shapes_model

    started = time.perf_counter()
    path = make_shapes_model(tmp_path_factory.mktemp("shapes") / "model")
    return path, time.perf_counter() - started


@pytest.fixture(scope="module")
def engine(shapes_model):
    import torch

    from ddim_worker.core.engine import EditEngine

    # One thread: this model's calls are tiny, and on a busy 2-core machine two threads thrash (10-50x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield EditEngine.from_pretrained(str(shapes_model[0]), device="cpu", dtype="fp32", size=64)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def settings():
    from ddim_worker.shapes.model import edit_settings

    return edit_settings()


@pytest.fixture(scope="module")
def scenes():
    pairs = colour_edits(held_out(COUNT))
    return pairs, [S.render(sc) for sc, _ in pairs]


def _rows(scenes, settings, inversion="ddim", same_prompt=False, **overrides):
    from ddim_worker.core.engine import EditRow

    pairs, sources = scenes
    kw = dict(num_steps=settings["num_steps"], start_step=settings["start_step"],
              guidance_scale=settings["guidance_scale"], inversion_guidance=settings["inversion_guidance"])
    kw.update(overrides)
    return [EditRow(image=src, source_prompt=sc.caption,
                    edit_prompt=sc.caption if same_prompt else sc.with_(colour=new).caption,
                    inversion=inversion, seed=i, **kw) for i, (src, (sc, new)) in enumerate(zip(sources, pairs))]


def test_make_shapes_model_writes_a_diffusers_folder_fast(shapes_model):
    from transformers import CLIPTokenizer

    path, seconds = shapes_model
    assert seconds < 5
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (path / part).exists()
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
    ids = tokenizer("a purple triangle on a gray background").input_ids
    assert len(ids) == 9  # bos, seven whole words, eos


def test_colour_edits_succeed_and_keep_the_background(engine, settings, scenes):
    pairs, sources = scenes
    outs = engine.edit(_rows(scenes, settings))
    judged = [judge(o.image, src, sc, new) for o, src, (sc, new) in zip(outs, sources, pairs)]
    assert sum(j["success"] for j in judged) >= COUNT - 1, judged
    assert np.mean([j["bg_psnr"] for j in judged]) > 26, judged


def test_ddim_keeps_the_background_better_than_noise(engine, settings, scenes):
    pairs, sources = scenes
    bg = {}
    for method in ("ddim", "noise"):
        outs = engine.edit(_rows(scenes, settings, inversion=method))
        bg[method] = np.mean([judge(o.image, src, sc, new)["bg_psnr"]
                              for o, src, (sc, new) in zip(outs, sources, pairs)])
    assert bg["ddim"] > bg["noise"] + 2, bg


def test_null_text_reconstructs_better_than_ddim(engine, settings, scenes):
    psnr = {}
    for method in ("ddim", "null-text:5"):
        outs = engine.edit(_rows(scenes, settings, inversion=method, guidance_scale=7.5, num_steps=20,
                                 start_step=4), measure_fidelity=True)
        psnr[method] = np.mean([o.psnr for o in outs])
    assert psnr["null-text:5"] > psnr["ddim"] + 0.5, psnr


def test_same_prompt_reproduces_the_input(engine, settings, scenes):
    pairs, sources = scenes
    outs = engine.edit(_rows(scenes, settings, same_prompt=True))
    for o, src, (sc, _) in zip(outs, sources, pairs):
        m = S.mask(sc)
        assert S.shape_colour(o.image, m) == sc.colour
        assert S.background_colour(o.image, m) == sc.background
    assert np.mean([S.psnr(o.image, src) for o, src in zip(outs, sources)]) > 24
