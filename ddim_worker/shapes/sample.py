"""Text-to-image with the engine: DDIM from seeded Gaussian noise (the textbook's first half), eta 0 or more."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ddim_worker.core.settings import DEFAULTS


def text_to_image(engine, prompts: Sequence[str], seeds: Sequence[int], num_steps: int = DEFAULTS.num_steps,
                  guidance_scale: float = 7.5, eta: float = 0.0, negative_prompt: str = "") -> np.ndarray:
    """(B, H, W, 3) uint8: one image per (prompt, seed), noise seeded per row."""
    h = engine.size // engine.pipe.vae_scale_factor
    channels = engine.pipe.unet.config.in_channels
    x = torch.stack([torch.randn(channels, h, h, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    latents = engine.sample(x, list(prompts), [negative_prompt] * len(prompts), [guidance_scale] * len(prompts),
                            num_steps, start_step=0, seeds=list(seeds), eta=eta)
    return engine.decode(latents)


def run_sample(model: str, prompt: str, num_images: int, out: str, seed: int = 0, num_steps: int = DEFAULTS.num_steps,
               eta: float = 0.0, guidance_scale: float = 7.5, size: int = 64, device: str = "cpu",
               dtype: str = "fp32") -> list[Path]:
    from PIL import Image

    from ddim_worker.core.engine import EditEngine

    engine = EditEngine.from_pretrained(model, device=device, dtype=dtype, size=size)
    images = text_to_image(engine, [prompt] * num_images, [seed + i for i in range(num_images)], num_steps,
                           guidance_scale, eta)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"sample-{seed + i:04d}.png"
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths
