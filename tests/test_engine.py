"""The engine on the tiny random-weight SD model: equal to diffusers, batched, counted, reproducible, strict."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from ddim_worker.core.engine import EditEngine, EditRow, PromptTruncatedWarning
from ddim_worker.core.images import encode_png


@pytest.fixture(scope="module")
def engine(tiny_model_path) -> EditEngine:
    return EditEngine.from_pretrained(str(tiny_model_path), size=64)


def test_image(seed: int, size: int = 64) -> np.ndarray:
    """A smooth image with structure (gradients + a disc), distinct per seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 1, 3)
    disc = ((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2) < 0.05
    img = np.stack([xx * base[0], yy * base[1], (1 - xx) * base[2]], axis=-1) + disc[..., None] * 0.5
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


def test_text_to_image_equals_stable_diffusion_pipeline(engine):
    pipe: StableDiffusionPipeline = engine.pipe
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts, negative = ["a photo of a cat", "a red car"], ["blurry", "blurry"]
    reference = pipe(prompts, negative_prompt=negative, latents=noise.clone(), num_inference_steps=20,
                     guidance_scale=3.5, output_type="latent").images
    ours = engine.sample(noise, prompts, negative, [3.5, 3.5], num_steps=20, start_step=0)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    reference_images = pipe(prompts, negative_prompt=negative, latents=noise.clone(), num_inference_steps=20,
                            guidance_scale=3.5, output_type="np").images
    ours_images = engine.decode(ours)
    np.testing.assert_allclose(ours_images.astype(float), np.round(reference_images * 255), atol=1)


def test_unet_runs_n_minus_s_times_each_way_with_the_whole_batch(engine):
    calls: list[int] = []
    handle = engine.pipe.unet.register_forward_hook(lambda m, args, kwargs_out: calls.append(args[0].shape[0]))
    try:
        rows = [EditRow(test_image(i), "a photo of a dog", f"a photo of a {a}", num_steps=12, start_step=4,
                        guidance_scale=g, seed=i)
                for i, (a, g) in enumerate([("cat", 3.5), ("bird", 1.0), ("horse", 7.0)])]
        engine.edit(rows)
    finally:
        handle.remove()
    # Inverting: the whole batch in each call, doubled for CFG. Sampling: the guided rows in calls of their own
    # (doubled) and the row at guidance 1 in calls of its own, run once: guidance costs only where it is used.
    assert calls == [2 * 3] * (12 - 4) + [2 * 2] * (12 - 4) + [1] * (12 - 4)


def test_unguided_rows_need_half_the_unet_work(engine):
    calls: list[int] = []
    handle = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        engine.edit([EditRow(test_image(0), "a cat", "a dog", num_steps=6, start_step=2, guidance_scale=1.0,
                             inversion_guidance=1.0)])
    finally:
        handle.remove()
    assert calls == [1] * 8


def test_mixed_batch_equals_rows_one_by_one(engine):
    rows = [
        EditRow(test_image(0), "a photo of a dog", "a photo of a cat", num_steps=10, start_step=2, seed=1),
        EditRow(test_image(1), "a house", "a red house", num_steps=10, start_step=2, guidance_scale=7.0, seed=2),
        EditRow(test_image(2), "a tree", "a tree in winter", negative_prompt="blurry", num_steps=8, start_step=3,
                seed=3),
        EditRow(Image.fromarray(test_image(3, 96)).convert("RGBA"), "a bird", "a blue bird", num_steps=10,
                start_step=5, guidance_scale=1.0, inversion_guidance=2.0, seed=4, eta=0.5),
    ]
    together = engine.edit(rows)
    for row, out in zip(rows, together):
        [alone] = engine.edit([row])
        np.testing.assert_allclose(out.image.astype(int), alone.image.astype(int), atol=1)
        torch.testing.assert_close(out.trajectory.latents, alone.trajectory.latents, rtol=1e-4, atol=1e-5)


def test_trajectory_is_labelled_and_reaches_the_start_level(engine):
    [out] = engine.edit([EditRow(test_image(5), "a cat", "a dog", num_steps=10, start_step=3)])
    schedule = engine.schedule(10)
    assert out.trajectory.timesteps == [-1] + list(reversed(schedule.timesteps[3:]))
    assert out.trajectory.latents.shape == (10 - 3 + 1, 1, 4, 8, 8)
    assert out.inversion_passes == 7 and out.sampling_passes == 7


def test_same_inputs_give_byte_identical_pngs(engine):
    def run(eta: float) -> list[bytes]:
        rows = [EditRow(test_image(i), "a cat", "a dog", num_steps=8, start_step=2, seed=7 + i, eta=eta)
                for i in range(2)]
        return [encode_png(o.image, {"edit_prompt": "a dog"}) for o in engine.edit(rows)]

    assert run(0.0) == run(0.0)
    first = run(0.8)
    assert first == run(0.8)
    assert first != run(0.0)  # eta really adds (seeded) noise


def test_rows_sharing_an_inversion_are_inverted_once(engine):
    image = test_image(9)
    rows = [EditRow(image, "a cat", f"a {c} cat", num_steps=10, start_step=2) for c in ("red", "blue", "green")]
    calls: list[int] = []
    handle = engine.pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        outs = engine.edit(rows)
    finally:
        handle.remove()
    assert [o.inversion_passes for o in outs] == [8, 0, 0]
    assert [o.shared_inversion for o in outs] == [False, True, True]
    assert calls == [2] * 8 + [6] * 8
    assert not np.array_equal(outs[0].image, outs[1].image)


def test_cached_trajectory_skips_or_continues_inversion(engine):
    image = test_image(11)
    [full] = engine.edit([EditRow(image, "a cat", "a dog", num_steps=10, start_step=2)])
    # shallower start: read the stored level, no inversion
    [shallow] = engine.edit([EditRow(image, "a cat", "a bird", num_steps=10, start_step=5, cached=full.trajectory)])
    [fresh] = engine.edit([EditRow(image, "a cat", "a bird", num_steps=10, start_step=5)])
    assert shallow.cache_hit and shallow.inversion_passes == 0
    np.testing.assert_array_equal(shallow.image, fresh.image)
    # deeper start: continue from the deepest stored level
    [deeper] = engine.edit([EditRow(image, "a cat", "a bird", num_steps=10, start_step=0, cached=full.trajectory)])
    [deeper_fresh] = engine.edit([EditRow(image, "a cat", "a bird", num_steps=10, start_step=0)])
    assert deeper.cache_hit and deeper.inversion_passes == 2
    assert deeper.trajectory.timesteps == deeper_fresh.trajectory.timesteps
    np.testing.assert_allclose(deeper.image.astype(int), deeper_fresh.image.astype(int), atol=1)


def test_no_deprecated_diffusers_api_is_called(engine):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        engine.encode_prompts(["a fresh prompt nobody encoded"])
        engine.edit([EditRow(test_image(0), "a cat", "a dog", num_steps=4, start_step=1)])
        # The filter really catches the deprecated calls: the textbook's would fail here.
        with pytest.raises(FutureWarning, match="_encode_prompt"):
            engine.pipe._encode_prompt("a cat", engine.device, 1, True, "")
        with pytest.raises(FutureWarning, match="decode_latents"):
            engine.pipe.decode_latents(torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"num_steps": 0}, r"num_steps must be in \[1, 1000\], got 0"),
        ({"num_steps": 1001}, r"num_steps must be in \[1, 1000\], got 1001"),  # the manifest's rule too
        ({"guidance_scale": 101.0}, r"guidance_scale must be in \[0, 100\]"),
        ({"eta": 1.5}, r"eta must be in \[0, 1\]"),
        ({"inversion": "null-text"}, "null-text needs optimiser iterations"),
        ({"start_step": 10}, r"start_step must be in \[0, num_steps=10\), got 10"),
        ({"start_step": -1}, "start_step must be in"),
        ({"guidance_scale": -1.0}, r"guidance_scale must be in \[0, 100\], got -1.0"),
        ({"inversion_guidance": float("nan")}, "inversion_guidance"),
        ({"num_steps": "50"}, "num_steps must be an integer, got '50'"),
        ({"image": np.zeros((0, 0, 3), np.uint8)}, "empty"),
        ({"image": Image.new("I;16", (64, 64))}, "unsupported mode 'I;16'"),
        ({"image": np.zeros((64, 64), np.float32)}, "uint8"),
        ({"source_prompt": None}, "prompts must be strings"),
    ],
)
def test_bad_input_is_a_clear_error(engine, change, match):
    fields = dict(image=test_image(0), source_prompt="a cat", edit_prompt="a dog", num_steps=10, start_step=2)
    fields.update(change)
    with pytest.raises(ValueError, match=match):
        engine.edit([EditRow(**fields)])


def test_size_must_be_a_multiple_of_eight(engine):
    with pytest.raises(ValueError, match="multiple of 8, got 60"):
        EditEngine(engine.pipe, size=60)


def test_long_prompt_is_truncated_with_a_warning(engine):
    long_prompt = "a photo of a cat " * 40
    with pytest.warns(PromptTruncatedWarning, match="truncated"):
        long_embed = engine.encode_prompts([long_prompt])
    ids = engine.pipe.tokenizer(long_prompt, truncation=True, max_length=77).input_ids
    cut = engine.pipe.tokenizer.decode(ids[1:-1])
    torch.testing.assert_close(long_embed, engine.encode_prompts([cut]), rtol=1e-5, atol=1e-5)


def test_prompts_are_encoded_once(engine):
    before = engine.stats.prompt_encodings
    engine.encode_prompts(["one prompt", "another prompt", "one prompt"])
    engine.encode_prompts(["one prompt"])
    assert engine.stats.prompt_encodings - before == 2


@pytest.fixture
def one_thread():
    """CPU kernels split work across threads by batch: bitwise batch invariance holds per thread count (a job's CPU
    actor runs torch on the cores it was given, 1 by default)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fixed_batch_size_makes_rows_independent_of_their_neighbours(tiny_model_path, one_thread):
    engine = EditEngine.from_pretrained(str(tiny_model_path), size=64, batch_size=3)
    rows = [EditRow(test_image(i), "a cat", f"a dog {i}", num_steps=6, start_step=2, seed=i,
                    guidance_scale=1.0 if i == 2 else 3.5) for i in range(5)]
    together = engine.edit(rows)  # chunks of 3 + 2 (padded to 3)
    for i in (0, 2, 4):
        [alone] = engine.edit([rows[i]])
        assert np.array_equal(alone.image, together[i].image), i
        assert torch.equal(alone.trajectory.latents, together[i].trajectory.latents), i
    shuffled = engine.edit([rows[4], rows[2], rows[0]])
    for j, i in enumerate((4, 2, 0)):
        assert np.array_equal(shuffled[j].image, together[i].image), i
    # every call padded to the batch size: doubled where its rows use guidance, once for the row at guidance 1
    assert set(engine.guided_unet.call_sizes) == {6, 3}


def test_trajectories_are_kept_in_the_engine_dtype_and_a_cache_hit_gives_the_same_bytes(tiny_model_path):
    """An engine running bf16 (a GPU's dtype; here on the CPU) keeps its trajectories in bf16, half the bytes of fp32
    in the latent cache, and samples from exactly those levels: an edit from the cache is the fresh edit's bytes."""
    from ddim_worker.core.trajectory_codec import decode_trajectory, encode_trajectory_blob

    bf16 = EditEngine.from_pretrained(str(tiny_model_path), device="cpu", dtype="bf16", size=64, batch_size=2)
    row = dict(image=test_image(5), source_prompt="a cat", edit_prompt="a dog", num_steps=6, start_step=2)
    fresh = bf16.edit([EditRow(**row)])[0]
    assert fresh.trajectory.latents.dtype == torch.bfloat16 and fresh.inversion_passes == 4
    blob = encode_trajectory_blob(fresh.trajectory)
    levels = fresh.trajectory.latents.numel()
    assert levels * 2 <= len(blob) < levels * 4  # 2 bytes a value, not 4
    cached = bf16.edit([EditRow(**row, cached=decode_trajectory(blob))])[0]
    assert cached.cache_hit and cached.inversion_passes == 0
    assert np.array_equal(cached.image, fresh.image)
    # Two edits of one image share one inversion, and one copy of it leaves the engine (not one per row).
    pair = bf16.edit([EditRow(**row), EditRow(**{**row, "edit_prompt": "a fox"})])
    assert pair[0].trajectory is pair[1].trajectory and pair[1].shared_inversion
