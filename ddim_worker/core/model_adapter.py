"""The model adapter: the one owner of the pipeline's UNet, VAE and text encoder, the prompt cache and the counters.

Every UNet evaluation of an edit goes through :meth:`ModelAdapter.denoise` (sampling, inversion, riders, masks) or
:meth:`ModelAdapter.conditional` (null-text's differentiable prediction), both on the adapter's denoiser: the
pipeline's UNet with classifier-free guidance (``GuidedUNet``) or one a caller injected. Its counters are the
denoiser's, so a report never reads a bypassed UNet.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_worker.core.attention_control import RowControl
from ddim_worker.core.denoiser import Conditioning, GuidedUNet, pad_rows
from ddim_worker.core.edit_types import EditRow, PromptTruncatedWarning, Stats
from ddim_worker.core.models import check_scheduler_config
from ddim_worker.core.sampler import Denoiser, Schedule
from ddim_worker.core.settings import ENGINE_DEFAULTS
from ddim_worker.core.token_alignment import align_tokens

#: Distinct prompt strings kept encoded; a job reuses a few source prompts many times, so this rarely evicts.
PROMPT_CACHE_SIZE = 4096

#: A call's layout as its plan has it: (rows per CFG half after padding, whether it runs both halves); None: none.
Layout = tuple[int | None, bool] | None

#: PIL modes the engine converts to RGB itself; anything else (16-bit, float) must go through ``images.decode_image``.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr"}


class ModelAdapter:
    """One loaded pipeline behind the calls an edit makes: prompts, images, latents and the denoiser."""

    def __init__(self, pipe: Any, *, size: int = ENGINE_DEFAULTS.size, denoiser: Denoiser | None = None,
                 vae_sample: bool = False, batch_size: int | None = None):
        if not isinstance(size, int) or size <= 0 or size % 8:
            raise ValueError(f"size must be a positive multiple of 8, got {size!r}")
        if size % pipe.vae_scale_factor:
            raise ValueError(f"size {size} is not a multiple of the VAE's scale factor {pipe.vae_scale_factor}")
        check_scheduler_config(dict(pipe.scheduler.config))  # before any UNet call: refuse what we would run wrong
        self.pipe = pipe
        self.size = size
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        # ``batch_size``: run every model call on exactly this many rows (padding partial batches, splitting larger
        # ones), so each row's pixels are the same bytes whatever it was batched with. Costs the padding only.
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.guided_unet = GuidedUNet(pipe.unet, pad_to=batch_size)
        self.denoiser: Denoiser = denoiser if denoiser is not None else self.guided_unet
        self.vae_sample = vae_sample
        self.scheduler_config = dict(pipe.scheduler.config)
        self.stats = Stats()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._schedules: dict[int, Schedule] = {}

    # -- the UNet ------------------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``eps = denoiser(x, t, cond)``: the one guided call site (sampling, inversion, riders, masks)."""
        return self.denoiser(x, t, cond)

    def conditional(self, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        """One unguided prediction, differentiable in ``context`` (null-text): the denoiser's own ``conditional``
        where it has one, else the denoiser called unguided, so an injected denoiser is never bypassed."""
        own = getattr(self.denoiser, "conditional", None)
        if own is not None:
            return own(x, t, context)
        ones = torch.ones(x.shape[0], device=context.device)
        return self.denoiser(x, t, Conditioning(context, context, ones))

    @property
    def unet_samples(self) -> int:
        """UNet samples run so far (padding and the CFG doubling included), counted by the denoiser that ran them:
        an injected denoiser's own counter where it keeps one, so a report never reads a bypassed adapter."""
        return int(getattr(self.denoiser, "samples", self.guided_unet.samples))

    def schedule(self, num_steps: int) -> Schedule:
        if num_steps not in self._schedules:
            self._schedules[num_steps] = Schedule.from_config(self.scheduler_config, num_steps)
        return self._schedules[num_steps]

    # -- prompts -------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, L, D) embeddings through diffusers' ``encode_prompt``; each distinct string is encoded once."""
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(f"prompts must be strings, got {type(prompt).__name__}: {prompt!r}")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            self._warn_truncated(missing)
            # One prompt per call when batch invariance is on: an embedding must not depend on its neighbours.
            chunks = [[p] for p in missing] if self.batch_size is not None else [missing]
            embeds = torch.cat([self.pipe.encode_prompt(chunk, self.device, num_images_per_prompt=1,
                                                        do_classifier_free_guidance=False)[0] for chunk in chunks])
            self.stats.prompt_encodings += len(missing)
            for prompt, embed in zip(missing, embeds):
                self._prompt_cache[prompt] = embed
            while len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                self._prompt_cache.popitem(last=False)
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def _warn_truncated(self, prompts: Sequence[str]) -> None:
        """CLIP reads at most ``model_max_length`` tokens; say which prompts lose their tail, as diffusers does."""
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length
        for prompt in prompts:
            n_tokens = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
            if n_tokens > limit:
                warnings.warn(f"prompt of {n_tokens} tokens truncated to the text encoder's {limit}: "
                              f"{prompt[:60]!r}...", PromptTruncatedWarning, stacklevel=4)

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str], guidance: Sequence[float],
                     layout: Layout = None) -> Conditioning:
        """The call's conditioning; ``layout``: its planned (rows per CFG half, doubled), which the denoiser runs."""
        embeds = self.encode_prompts(list(prompts) + list(negative_prompts))
        n = len(prompts)
        pad_to, doubled = layout if layout is not None else (None, None)
        return Conditioning(embeds[:n], embeds[n:], torch.tensor([float(g) for g in guidance], device=self.device),
                            pad_to=pad_to, doubled=doubled)

    def row_control(self, row: EditRow) -> RowControl | None:
        """The row's attention control (its token map from the two prompts), or None without control."""
        if not row.controlled:
            return None
        tokenizer = self.pipe.tokenizer
        length = tokenizer.model_max_length
        ids = [tokenizer(p, truncation=True, max_length=length).input_ids for p in (row.source_prompt,
                                                                                    row.edit_prompt)]
        return RowControl(float(row.cross_replace), float(row.self_replace), align_tokens(ids[0], ids[1], length),
                          float(row.edit_word_weight), str(row.control_rules))

    # -- images --------------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """(B, 3, size, size) in [-1, 1]: RGB, shorter side resized to ``size``, centre-cropped."""
        from ddim_worker.core.images import preprocess as resize_and_crop

        arrays = []
        for i, image in enumerate(images):
            if isinstance(image, np.ndarray):
                if image.size == 0:
                    raise ValueError(f"image {i} is empty (shape {image.shape})")
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                    raise ValueError(f"image {i}: arrays must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
                if image.shape[:2] == (self.size, self.size):
                    arrays.append(image)
                    continue
                image = Image.fromarray(image)
            if not isinstance(image, Image.Image):
                raise ValueError(f"image {i} must be a PIL image or a uint8 array, got {type(image).__name__}")
            if image.width == 0 or image.height == 0:
                raise ValueError(f"image {i} is empty ({image.width}x{image.height})")
            if image.mode not in CONVERTIBLE_MODES:
                raise ValueError(f"image {i} has unsupported mode {image.mode!r}; decode it with "
                                 "ddim_worker.core.images.decode_image, which converts 16-bit and float images")
            arrays.append(resize_and_crop(image.convert("RGB"), self.size))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        # contiguous (NCHW): a permuted view would run channels-last kernels on some calls and not on others
        return (pixels.to(torch.float32) / 127.5 - 1.0).contiguous()

    def input_pixels(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """The images as the engine sees them: uint8 (B, size, size, 3), resized and centre-cropped."""
        return ((self.preprocess(images) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def _vae_call(self, fn: Any, x: torch.Tensor) -> Any:
        """``fn(x)``, in padded chunks of ``batch_size`` rows when batch invariance is on."""
        if self.batch_size is None:
            return fn(x)
        parts = [fn(pad_rows(x[i:i + self.batch_size], self.batch_size)) for i in range(0, x.shape[0], self.batch_size)]
        n = [min(self.batch_size, x.shape[0] - i) for i in range(0, x.shape[0], self.batch_size)]
        if isinstance(parts[0], torch.Tensor):
            return torch.cat([p[:k] for p, k in zip(parts, n)])
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        return DiagonalGaussianDistribution(torch.cat([p.parameters[:k] for p, k in zip(parts, n)]))

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """x0 latents (B, 4, size/8, size/8), float32: the posterior mean, or a per-row seeded sample."""
        vae = self.pipe.vae
        dist = self._vae_call(lambda chunk: vae.encode(chunk).latent_dist, pixels.to(self.device, vae.dtype))
        latents = dist.mean.float()
        if self.vae_sample:
            if seeds is None:
                raise ValueError("vae_sample needs per-row seeds: an unseeded sample makes the job non-deterministic")
            noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                                 for s in seeds]).to(latents.device)
            latents = latents + dist.std.float() * noise
        return (latents * vae.config.scaling_factor).contiguous()

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """(B, H, W, 3) uint8 images from x0 latents, through ``vae.decode`` and the pipeline's image processor."""
        vae = self.pipe.vae
        images = self._vae_call(lambda chunk: vae.decode(chunk, return_dict=False)[0],
                                latents.to(vae.dtype) / vae.config.scaling_factor)
        images = self.pipe.image_processor.postprocess(images.float(), output_type="pt")  # (B, 3, H, W) in [0, 1]
        return (images * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
