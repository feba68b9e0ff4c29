"""ddim_worker.core.fastpath: every switch on and off on the tiny pipeline, batch size from free memory, pinned copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddim_worker.core import fastpath
from ddim_worker.core.engine import EditEngine, EditRow

GiB = 2**30


@pytest.fixture(scope="module")
def engine(tiny_model_path):
    return EditEngine.from_pretrained(str(tiny_model_path), device="cpu", size=64)


def _row(seed: int = 0) -> EditRow:
    rng = np.random.default_rng(seed)
    return EditRow(image=rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), source_prompt="a photo of a dog",
                   edit_prompt="a photo of a cat", num_steps=6, start_step=2)


def _processors(module) -> set[str]:
    return {type(p).__name__ for p in module.attn_processors.values()}


def test_switches_on_and_off(engine):
    pipe = engine.pipe
    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d))
    before = engine.edit([_row()])[0].image

    applied = fastpath.apply_fast_path(pipe, channels_last=True, compile_unet=False, attention="math")
    assert applied == {"attention": "math", "channels_last": True, "compile_unet": False, "compile_mode": None,
                       "compile_dynamic": False}
    assert _processors(pipe.unet) == {"AttnProcessor"} and _processors(pipe.vae) == {"AttnProcessor"}
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    during = engine.edit([_row()])[0].image
    # Same maths, other kernels: the 8-bit outputs agree up to rounding.
    assert np.abs(during.astype(int) - before.astype(int)).max() <= 2

    fastpath.apply_fast_path(pipe, channels_last=False, compile_unet=False, attention="sdpa")
    assert _processors(pipe.unet) == {"AttnProcessor2_0"}
    assert conv.weight.is_contiguous() and not conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(engine.edit([_row()])[0].image, before)


def test_compile_switch_is_in_place_and_reversible(engine):
    pipe = engine.pipe
    unet = pipe.unet
    fastpath.set_compile(pipe, True)  # lazy: nothing is compiled until the first call
    assert fastpath.is_compiled(pipe) and pipe.unet is unet and engine.guided_unet.unet is unet
    fastpath.apply_fast_path(pipe, channels_last=False, compile_unet=False)
    assert not fastpath.is_compiled(pipe)


def test_unknown_attention_is_refused(engine):
    with pytest.raises(ValueError, match="attention"):
        fastpath.apply_fast_path(engine.pipe, channels_last=False, compile_unet=False, attention="flash3")


def test_auto_batch_size():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert fastpath.auto_batch_size(75 * 10**9, 512, bf16) == 32  # an 80 GB H100 after loading SD 1.5
    assert fastpath.auto_batch_size(21 * 10**9, 512, bf16) == 16  # a 24 GB card
    assert fastpath.auto_batch_size(21 * 10**9, 512, fp32) == 8  # fp32 rows are twice the bytes
    assert fastpath.auto_batch_size(8 * 10**9, 512, bf16) == 4
    assert fastpath.auto_batch_size(1 * GiB, 512, bf16) == 1  # never below 1 (nothing left after the reserve)
    assert fastpath.auto_batch_size(75 * 10**9, 256, bf16) == 32  # capped
    assert fastpath.auto_batch_size(75 * 10**9, 256, bf16, max_batch=64) == 64
    assert fastpath.row_bytes(1024, bf16) == 4 * fastpath.row_bytes(512, bf16)
    for free in (3 * GiB, 10 * GiB, 40 * GiB):  # powers of two, growing with free memory
        b = fastpath.auto_batch_size(free, 512, bf16)
        assert b & (b - 1) == 0
    with pytest.raises(ValueError):
        fastpath.auto_batch_size(GiB, 0, bf16)


def test_batch_size_before_load_takes_the_weights_off_first():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert fastpath.batch_size_before_load(79 * GiB, 512, bf16) == 32  # an idle 80 GB H100: capped
    assert fastpath.batch_size_before_load(22 * GiB, 512, bf16) == 16  # a 24 GB card
    assert fastpath.batch_size_before_load(22 * GiB, 512, fp32) == 8  # fp32: weights and activations twice as big
    assert fastpath.batch_size_before_load(6 * GiB, 512, fp16) == 1
    # 5 GiB free after loading fits 2 rows, but not once 2.2 GiB of weights are still to come.
    assert fastpath.auto_batch_size(5 * GiB, 512, bf16) == 2
    assert fastpath.batch_size_before_load(5 * GiB, 512, bf16) == 1


def test_free_memory_and_pinned_copy_on_cpu():
    assert fastpath.free_device_bytes("cpu") is None
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    tensor = fastpath.pinned_to_device(array, "cpu")
    assert tensor.device.type == "cpu" and np.array_equal(tensor.numpy(), array)
    assert fastpath.pinned_to_device(torch.ones(3), "cpu").sum() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_copy_on_cuda():  # pragma: no cover - runs on a GPU machine
    array = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    tensor = fastpath.pinned_to_device(array, "cuda")
    assert tensor.is_cuda and np.array_equal(tensor.cpu().numpy(), array)
    assert fastpath.free_device_bytes("cuda") > 0


def test_rows_under_attention_control_are_sized_with_their_measured_bytes():
    bf16 = torch.bfloat16
    plain_row = fastpath.row_bytes(512, bf16)
    assert fastpath.row_bytes(512, bf16, control=True) == int(fastpath.CONTROL_ROW_FACTOR * plain_row)
    free = 20 * GiB
    plain, controlled = (fastpath.auto_batch_size(free, 512, bf16, max_batch=4096, control=c) for c in (False, True))
    assert controlled <= plain
    # at the edge of a power of two the measured 2 % more per row costs a halving
    edge = int((8 * plain_row + fastpath.RESERVE_BYTES) / (1 - fastpath.RESERVE_FRACTION)) + 1
    assert fastpath.auto_batch_size(edge, 512, bf16) == 8
    assert fastpath.auto_batch_size(edge, 512, bf16, control=True) == 4
