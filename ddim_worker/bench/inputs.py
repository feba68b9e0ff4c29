"""The benchmark's inputs: synthetic images, the prompts, and the rows built from them."""

from __future__ import annotations

import numpy as np

from ddim_worker.bench.config import BenchConfig
from ddim_worker.core.engine import EditRow
from ddim_worker.synthetic import pictures

#: The prompts of the benchmark's rows. Words the tiny tokenizer knows whole, like the textbook's examples.
SOURCE_PROMPT = "a photo of a puppy on the grass"
EDIT_PROMPTS = ["a photo of a cat on the grass", "a photo of an old grey dog on the grass",
                "a watercolor painting of a puppy on the grass", "a photo of a puppy on the snow"]
RERUN_PROMPTS = ["a photo of a black cat on the grass", "a sketch of a puppy on the grass",
                 "a photo of a puppy on the beach", "an oil painting of a puppy on the grass"]
#: The edit prompts of the grouping rows (one image, several prompts).
GROUP_PROMPTS = EDIT_PROMPTS + RERUN_PROMPTS


def make_images(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct, deterministic pictures (gradients, a disc, stripes): uint8 (size, size, 3)."""
    return pictures(count, size, seed)


def make_rows(images: list[np.ndarray], cfg: BenchConfig, prompts: list[str] = EDIT_PROMPTS) -> list[EditRow]:
    """One edit per image, prompts in turn."""
    settings = cfg.edit_settings()
    return [EditRow.from_settings(image, SOURCE_PROMPT, prompts[i % len(prompts)], settings)
            for i, image in enumerate(images)]


def group_pairs(cfg: BenchConfig, grouped: bool = True) -> list[tuple[int, str]]:
    """(image index, edit prompt) of ``group_images`` images x ``group_prompts`` prompts. Grouped: image-major, so each
    run of ``group_prompts`` rows is one image (one inversion); ungrouped: prompt-major, so no batch shares an image."""
    pairs = [(i, k) for i in range(cfg.group_images) for k in range(cfg.group_prompts)]
    if not grouped:
        pairs.sort(key=lambda p: (p[1], p[0]))
    return [(i, GROUP_PROMPTS[k % len(GROUP_PROMPTS)]) for i, k in pairs]


def group_rows(images: list[np.ndarray], cfg: BenchConfig, grouped: bool) -> list[EditRow]:
    """The grouping rows (``group_pairs``) as engine rows."""
    settings = cfg.edit_settings()
    return [EditRow.from_settings(images[i], SOURCE_PROMPT, prompt, settings)
            for i, prompt in group_pairs(cfg, grouped)]
