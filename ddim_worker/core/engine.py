"""The editing engine: batched DDIM inversion under the source prompt, then sampling under the edit prompt.

One ``EditEngine`` holds one pipeline (loaded once) and edits lists of rows: rows that share (steps, start step, eta)
run together, every UNet call carries the whole group (doubled for classifier-free guidance), prompts are encoded once
per distinct string, and rows that share an image, source prompt and inversion settings are inverted once. Rows
with attention control or direct inversion are sampled beside one source branch per image, shared by all of its
edits.

``EditEngine`` is a facade over modules with one job each:

- ``edit_types``: the rows, outputs and per-row work records (pure data);
- ``model_adapter``: the pipeline (UNet, VAE, text encoder), the prompt cache, the counters, and the one UNet call
  site (``denoise``, and ``conditional`` for null-text);
- ``loops``: inversion, sampling and sampling with riding inversions, on the adapter;
- ``group_run``: one group's edit in numbered steps, over ``inversion_steps``, ``mask_step`` and
  ``sampling_steps`` and the plan of its UNet calls (``call_plan``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_worker.core import loops
from ddim_worker.core.attention_control import CallControl, RowControl
from ddim_worker.core.denoiser import Conditioning, GuidedUNet
from ddim_worker.core.edit_types import (EditOutput, EditRow, PromptTruncatedWarning, validate_settings)
from ddim_worker.core.group_run import edit_group
from ddim_worker.core.model_adapter import CONVERTIBLE_MODES, PROMPT_CACHE_SIZE, ModelAdapter
from ddim_worker.core.models import choose_device, choose_dtype, load_pipeline, model_fingerprint
from ddim_worker.core.sampler import Callback, Denoiser, Schedule, Trajectory
from ddim_worker.core.settings import ENGINE_DEFAULTS

__all__ = ["CONVERTIBLE_MODES", "PROMPT_CACHE_SIZE", "EditEngine", "EditOutput", "EditRow", "PromptTruncatedWarning",
           "validate_settings"]



class EditEngine:
    """Loads a Stable Diffusion 1.x pipeline once and edits batches of rows with DDIM inversion.

    ``denoiser`` defaults to the pipeline's UNet with classifier-free guidance; tests pass an analytic one.
    """

    def __init__(self, pipe: Any, *, size: int = ENGINE_DEFAULTS.size, denoiser: Denoiser | None = None,
                 vae_sample: bool = False, fingerprint: str = "unknown", batch_size: int | None = None):
        self.model = ModelAdapter(pipe, size=size, denoiser=denoiser, vae_sample=vae_sample, batch_size=batch_size)
        self.fingerprint = fingerprint

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "auto", dtype: str = ENGINE_DEFAULTS.dtype,
                        size: int = ENGINE_DEFAULTS.size,
                        revision: str | None = None, variant: str | None = None, **kwargs: Any) -> EditEngine:
        """Load the pipeline once (local folder or Hub id: ``model_source.local_model_path`` copies an ``s3://``
        folder to one); bf16/fp16 on CUDA, fp32 on CPU."""
        torch_device = choose_device(device)
        torch_dtype = choose_dtype(dtype, torch_device)
        pipe = load_pipeline(model, torch_device, torch_dtype, revision=revision, variant=variant)
        fingerprint = model_fingerprint(model, revision=revision)
        return cls(pipe, size=size, fingerprint=fingerprint, **kwargs)

    # -- the model adapter's state, as the engine's ----------------------------------------------------------------
    pipe = property(lambda self: self.model.pipe)
    size = property(lambda self: self.model.size)
    device = property(lambda self: self.model.device)
    dtype = property(lambda self: self.model.dtype)
    batch_size = property(lambda self: self.model.batch_size)
    vae_sample = property(lambda self: self.model.vae_sample)
    scheduler_config = property(lambda self: self.model.scheduler_config)
    stats = property(lambda self: self.model.stats)
    guided_unet: GuidedUNet = property(lambda self: self.model.guided_unet)  # type: ignore[assignment]
    denoiser: Denoiser = property(lambda self: self.model.denoiser)  # type: ignore[assignment]

    @property
    def unet_samples(self) -> int:
        """UNet samples run so far (padding and the CFG doubling included), counted by the denoiser that ran them."""
        return self.model.unet_samples

    def schedule(self, num_steps: int) -> Schedule:
        return self.model.schedule(num_steps)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) embeddings through diffusers' ``encode_prompt``; each distinct string is encoded once."""
        return self.model.encode_prompts(prompts)

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str],
                     guidance: Sequence[float]) -> Conditioning:
        return self.model.conditioning(prompts, negative_prompts, guidance)

    def row_control(self, row: EditRow) -> RowControl | None:
        """The row's attention control (its token map from the two prompts), or None without control."""
        return self.model.row_control(row)

    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """(B, 3, size, size) in [-1, 1]: RGB, shorter side resized to ``size``, centre-cropped."""
        return self.model.preprocess(images)

    def input_pixels(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """The images as the engine sees them: uint8 (B, size, size, 3), resized and centre-cropped."""
        return self.model.input_pixels(images)

    def encode_images(self, pixels: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """x0 latents (B, 4, size/8, size/8), float32: the posterior mean, or a per-row seeded sample."""
        return self.model.encode_images(pixels, seeds)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 images from x0 latents, through ``vae.decode`` and the pipeline's image processor."""
        return self.model.decode(latents)

    # -- the two loops -------------------------------------------------------------------------------------------
    def invert(self, x: torch.Tensor, source_prompts: Sequence[str], negative_prompts: Sequence[str],
               guidance: Sequence[float], num_steps: int, start_step: int, from_level: int | None = None,
               refine: int = 0) -> Trajectory:
        """Invert latents ``x`` (at ``from_level``, default x0) up to level ``tau[start_step]``: n - s steps from x0."""
        return loops.invert(self.model, x, source_prompts, negative_prompts, guidance, num_steps, start_step,
                            from_level, refine)

    def sample(self, x: torch.Tensor, prompts: Sequence[str], negative_prompts: Sequence[str],
               guidance: Sequence[float], num_steps: int, start_step: int = 0, seeds: Sequence[int] | None = None,
               eta: float = 0.0, uncond_steps: dict[int, torch.Tensor] | None = None,
               control: CallControl | None = None, callback: Callback | None = None) -> torch.Tensor:
        """DDIM-sample latents ``x`` at level ``tau[start_step]`` down to x0 (``loops.sample``)."""
        return loops.sample(self.model, x, prompts, negative_prompts, guidance, num_steps, start_step, seeds, eta,
                            uncond_steps, control, callback)

    # -- the edit ------------------------------------------------------------------------------------------------
    def edit(self, rows: Sequence[EditRow], measure_fidelity: bool = False) -> list[EditOutput]:
        """Invert each row under its source prompt, sample it under its edit prompt, decode. Order is kept.

        ``measure_fidelity`` also resamples each inversion with its source prompt (n - s more passes) and reports
        PSNR/SSIM against the preprocessed input and the latent MSE against x0.
        """
        for i, row in enumerate(rows):
            try:
                validate_settings(row.num_steps, row.start_step, row.guidance_scale, row.inversion_guidance, row.eta)
                row.settings  # noqa: B018 - the one validator: method, seed and prompt types too
            except ValueError as exc:
                raise ValueError(f"row {i}: {exc}") from None
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.group, []).append(i)
        outputs: list[EditOutput | None] = [None] * len(rows)
        inverted: dict[Hashable, Trajectory] = {}
        # The deepest sampling level first: its trajectories hold every shallower group's levels, so an image whose
        # rows fall in several groups (a masked row samples deeper; eta is the group's) is inverted once.
        for (num_steps, start_step, eta), index in sorted(groups.items(), key=lambda item: item[0][1]):
            group_rows, lent = self._lend_trajectories([rows[i] for i in index], inverted)
            for k, (i, out) in enumerate(zip(index, edit_group(self.model, group_rows, num_steps, start_step, eta,
                                                              measure_fidelity))):
                if k in lent:  # inverted by an earlier group of this call: shared, not a latent-cache hit
                    out.cache_hit, out.shared_inversion = False, True
                elif rows[i].method.caches and not self.model.vae_sample:
                    inverted.setdefault(rows[i].inversion_key(), out.trajectory)
                outputs[i] = out
        self.stats.edits += len(rows)
        return outputs  # type: ignore[return-value]

    @staticmethod
    def _lend_trajectories(rows: list[EditRow], inverted: dict[Hashable, Trajectory]) -> tuple[list[EditRow], set]:
        """``rows`` with the trajectories earlier groups of this call inverted for the same key, as stored ones (a
        row with a stored trajectory of its own keeps it); and the positions of the rows given one."""
        out, lent = [], set()
        for k, row in enumerate(rows):
            trajectory = inverted.get(row.inversion_key()) if row.cached is None and row.method.caches else None
            if trajectory is not None:
                row = dataclasses.replace(row, cached=trajectory)
                lent.add(k)
            out.append(row)
        return out, lent
