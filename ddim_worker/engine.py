"""The editing engine: batched DDIM inversion under the source prompt, then sampling under the edit prompt.

One ``EditEngine`` holds one pipeline (loaded once) and edits lists of rows: rows that share (steps, start step, eta)
run together, every UNet call carries the whole group (doubled for classifier-free guidance), prompts are encoded once
per distinct string, and rows that share an image, source prompt and inversion settings are inverted once. Rows
with attention control or direct inversion are sampled beside one source branch per image, shared by all of its
edits. ``_edit_group`` runs in numbered steps over a plan of its UNet calls (``call_plan``).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_worker import sampler
from ddim_worker import schedule as sch
from ddim_worker.attention_control import CallControl, RowControl, StepControl, replaced_steps, step_control
from ddim_worker.call_plan import RowNeeds, SamplingCall, chunks, plan_inversions, plan_sampling
from ddim_worker.denoiser import Conditioning, GuidedUNet, pad_rows
from ddim_worker.inversion import InversionMethod, parse_method
from ddim_worker.inversion_key import InversionKey
from ddim_worker import masks as M
from ddim_worker.models import check_scheduler_config, choose_device, choose_dtype, load_pipeline, model_fingerprint
from ddim_worker.sampler import Callback, Denoiser, Schedule, Trajectory
from ddim_worker.settings import DEFAULTS, ENGINE_DEFAULTS, SETTING_NAMES, EditSettings, SettingError
from ddim_worker.token_alignment import align_tokens
from ddim_worker.trajectory_guides import TrajectoryGuide

log = logging.getLogger(__name__)

#: Distinct prompt strings kept encoded; a job reuses a few source prompts many times, so this rarely evicts.
PROMPT_CACHE_SIZE = 4096

#: PIL modes the engine converts to RGB itself; anything else (16-bit, float) must go through ``images.decode_image``.
CONVERTIBLE_MODES = {"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr"}


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder reads and was cut, as diffusers cuts it."""


@dataclass
class EditRow:
    """One edit: an image, its prompts and its settings (meanings, defaults and ranges: ``settings.EditSettings``)."""

    image: Image.Image | np.ndarray  # any size; RGB uint8 (H, W, 3) arrays are taken as they are
    source_prompt: str
    edit_prompt: str
    negative_prompt: str = DEFAULTS.negative_prompt
    num_steps: int = DEFAULTS.num_steps
    start_step: int = DEFAULTS.start_step  # inversion stops at level tau[start_step]; sampling runs over tau[s:]
    guidance_scale: float = DEFAULTS.guidance_scale
    inversion_guidance: float = DEFAULTS.inversion_guidance
    seed: int = DEFAULTS.seed
    eta: float = DEFAULTS.eta
    inversion: str = DEFAULTS.inversion
    cross_replace: float = DEFAULTS.cross_replace  # fractions of the n - s sampled steps (Prompt-to-Prompt)
    self_replace: float = DEFAULTS.self_replace
    edit_word_weight: float = DEFAULTS.edit_word_weight
    mask: str = DEFAULTS.mask
    cached: Trajectory | None = None  # a stored trajectory for this row (latents (L, 1, C, h, w)), if any

    @classmethod
    def from_settings(cls, image: Image.Image | np.ndarray, source_prompt: str, edit_prompt: str,
                      settings: EditSettings, cached: Trajectory | None = None) -> EditRow:
        return cls(image, source_prompt, edit_prompt, cached=cached, **settings.as_dict())

    @property
    def settings(self) -> EditSettings:
        """This row's settings, through the one validator (raises ``SettingError``)."""
        return EditSettings(**{name: getattr(self, name) for name in SETTING_NAMES})

    @property
    def sampling_start(self) -> int:
        """The level sampling starts from: the start step, or deeper with mask auto (``masks.sampling_start``: what
        the mask keeps is blended back and pasted, so the region it frees can be regenerated more)."""
        return M.sampling_start(int(self.start_step)) if self.mask == "auto" else int(self.start_step)

    @property
    def controlled(self) -> bool:
        """Whether the row reads a source branch's attention (Prompt-to-Prompt)."""
        return float(self.cross_replace) > 0 or float(self.self_replace) > 0

    @property
    def method(self) -> InversionMethod:
        """The parsed inversion method (parsed once per distinct spelling)."""
        return parse_method(self.inversion)

    def inversion_key(self) -> InversionKey:
        """Rows with equal keys invert to the same trajectory, so a batch inverts them once (``inversion_key``)."""
        return InversionKey.of(_pixels_digest(self.image), self.source_prompt, self.negative_prompt, self.num_steps,
                               self.inversion_guidance, self.inversion, self.seed)


@dataclass
class EditOutput:
    image: np.ndarray  # (H, W, 3) uint8
    trajectory: Trajectory  # this row's inversion trajectory from x0 to tau[start_step] (or deeper, if cached)
    inversion_passes: int  # denoiser evaluations spent inverting this row (0 when cached or shared)
    sampling_passes: int
    cache_hit: bool
    shared_inversion: bool = False  # inverted once together with an identical earlier row of the batch
    reconstruction: np.ndarray | None = None  # the inversion resampled with the source prompt (measure_fidelity)
    psnr: float | None = None  # reconstruction vs the preprocessed input, dB
    ssim: float | None = None
    latent_mse: float | None = None  # reconstructed vs encoded x0 latent
    source_passes: int = 0  # passes of the source branch charged to this row (one source branch per image)
    mask_passes: int = 0  # passes spent finding the row's mask (mask auto)
    attention_control: str = "none"  # none | word-swap | refine (Prompt-to-Prompt, chosen from the prompts)
    mask: np.ndarray | None = None  # (H, W) uint8, 255 where the edit changes the image (mask auto)
    latent: torch.Tensor | None = None  # (C, h, w) float32: the edit's sampled x0 latent, before decoding


@dataclass
class _Stats:
    edits: int = 0
    inversions: int = 0
    prompt_encodings: int = 0


def _pixels_digest(image: Image.Image | np.ndarray) -> str:
    array = np.asarray(image)
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def validate_settings(num_steps: Any, start_step: Any, guidance_scale: Any = DEFAULTS.guidance_scale,
                      inversion_guidance: Any = DEFAULTS.inversion_guidance, eta: Any = DEFAULTS.eta) -> None:
    """Raise ``ValueError`` (a ``SettingError``) naming the first bad setting: ``settings.validate``, the one rule."""
    for name, value in (("num_steps", num_steps), ("start_step", start_step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise SettingError(name, f"must be an integer, got {value!r}")
    EditSettings(num_steps=num_steps, start_step=start_step, guidance_scale=guidance_scale,
                 inversion_guidance=inversion_guidance, eta=eta)


class EditEngine:
    """Loads a Stable Diffusion 1.x pipeline once and edits batches of rows with DDIM inversion.

    ``denoiser`` defaults to the pipeline's UNet with classifier-free guidance; tests pass an analytic one.
    """

    def __init__(self, pipe: Any, *, size: int = ENGINE_DEFAULTS.size, denoiser: Denoiser | None = None, vae_sample: bool = False,
                 fingerprint: str = "unknown", batch_size: int | None = None):
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
        self.fingerprint = fingerprint
        self.scheduler_config = dict(pipe.scheduler.config)
        self.stats = _Stats()
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._schedules: dict[int, Schedule] = {}

    @classmethod
    def from_pretrained(cls, model: str, *, device: str = "auto", dtype: str = ENGINE_DEFAULTS.dtype,
                        size: int = ENGINE_DEFAULTS.size, storage_options: dict | None = None,
                        revision: str | None = None, variant: str | None = None, **kwargs: Any) -> EditEngine:
        """Load the pipeline once (local folder, hub id or ``s3://`` folder); bf16/fp16 on CUDA, fp32 on CPU."""
        torch_device = choose_device(device)
        torch_dtype = choose_dtype(dtype, torch_device)
        pipe = load_pipeline(model, torch_device, torch_dtype, storage_options, revision=revision, variant=variant)
        fingerprint = model_fingerprint(model, storage_options, revision=revision)
        return cls(pipe, size=size, fingerprint=fingerprint, **kwargs)

    @property
    def unet_samples(self) -> int:
        """UNet samples run so far (padding and the CFG doubling included), counted by the denoiser that ran them:
        an injected denoiser's own counter where it keeps one, so a report never reads a bypassed adapter."""
        return int(getattr(self.denoiser, "samples", self.guided_unet.samples))

    # -- schedule ------------------------------------------------------------------------------------------------
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
                              f"{prompt[:60]!r}...", PromptTruncatedWarning, stacklevel=3)

    def conditioning(self, prompts: Sequence[str], negative_prompts: Sequence[str],
                     guidance: Sequence[float]) -> Conditioning:
        embeds = self.encode_prompts(list(prompts) + list(negative_prompts))
        n = len(prompts)
        return Conditioning(embeds[:n], embeds[n:], torch.tensor([float(g) for g in guidance], device=self.device))

    # -- images --------------------------------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """(B, 3, size, size) in [-1, 1]: RGB, shorter side resized to ``size``, centre-cropped."""
        from ddim_worker.images import preprocess as resize_and_crop

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
                                 "ddim_worker.images.decode_image, which converts 16-bit and float images")
            arrays.append(resize_and_crop(image.convert("RGB"), self.size))
        pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
        # contiguous (NCHW): a permuted view would run channels-last kernels on some calls and not on others
        return (pixels.to(torch.float32) / 127.5 - 1.0).contiguous()

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

    # -- the two loops -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def invert(self, x: torch.Tensor, source_prompts: Sequence[str], negative_prompts: Sequence[str],
               guidance: Sequence[float], num_steps: int, start_step: int, from_level: int | None = None,
               refine: int = 0) -> Trajectory:
        """Invert latents ``x`` (at ``from_level``, default x0) up to level ``tau[start_step]``: n - s steps from x0."""
        validate_settings(num_steps, start_step, 0.0, min(guidance, default=0.0))
        cond = self.conditioning(source_prompts, negative_prompts, guidance)
        return sampler.invert(self.denoiser, x.to(self.device, torch.float32), self.schedule(num_steps), cond,
                              to_level=start_step, from_level=from_level, refine=refine)

    @torch.inference_mode()
    def sample(self, x: torch.Tensor, prompts: Sequence[str], negative_prompts: Sequence[str],
               guidance: Sequence[float], num_steps: int, start_step: int = 0, seeds: Sequence[int] | None = None,
               eta: float = 0.0, uncond_steps: dict[int, torch.Tensor] | None = None,
               control: CallControl | None = None, callback: Callback | None = None) -> torch.Tensor:
        """DDIM-sample latents ``x`` at level ``tau[start_step]`` down to x0 (start_step 0 and noise: text-to-image).

        ``uncond_steps`` maps a row to its per-step unconditional embeddings (n - s, L, D) (null-text inversion).
        ``control`` is the call's attention control (rows reading a source row of the same call); ``callback`` may
        return new latents after each step (``trajectory_guides``).
        """
        validate_settings(num_steps, start_step, min(guidance, default=0.0), 0.0, eta)
        cond = self.conditioning(prompts, negative_prompts, guidance)
        cond_at = None
        if uncond_steps or control is not None:
            def cond_at(i: int) -> Conditioning:
                uncond = cond.uncond
                if uncond_steps:
                    uncond = uncond.clone()
                    for row, embeds in uncond_steps.items():
                        uncond[row] = embeds[i - start_step].to(uncond)
                at_step: StepControl | None = control.at(i - start_step) if control is not None else None
                return Conditioning(cond.text, uncond, cond.guidance, at_step)
        noise = None
        if eta > 0:
            if seeds is None:
                raise ValueError("eta > 0 needs per-row seeds")
            generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]

            def noise(_: int) -> torch.Tensor:
                return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(self.device)

        return sampler.sample(self.denoiser, x.to(self.device, torch.float32), self.schedule(num_steps), cond,
                              start_level=start_step, eta=eta, noise=noise, cond_at=cond_at, callback=callback)

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
            groups.setdefault((int(row.num_steps), row.sampling_start, float(row.eta)), []).append(i)
        outputs: list[EditOutput | None] = [None] * len(rows)
        for (num_steps, start_step, eta), index in groups.items():
            for i, out in zip(index, self._edit_group([rows[i] for i in index], num_steps, start_step, eta,
                                                      measure_fidelity)):
                outputs[i] = out
        self.stats.edits += len(rows)
        return outputs  # type: ignore[return-value]

    def _forward_noise(self, x0: torch.Tensor, seeds: Sequence[int], schedule: Schedule,
                       start_step: int) -> Trajectory:
        """The img2img baseline: q(x_tau[s] | x0) with per-row seeded noise, no inversion."""
        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(int(s) + 2))
                             for s in seeds]).to(x0)
        noisy = sch.add_noise(x0, noise, float(schedule.alphas[start_step]))
        return Trajectory([sampler.CLEAN_TIMESTEP, schedule.label(start_step)], torch.stack([x0, noisy]))

    def _optimize_null_text(self, trajectories: list[Trajectory], rows: list[EditRow], schedule: Schedule,
                            start_step: int, iterations: int) -> tuple[torch.Tensor, int]:
        """Null-text embeddings (n - s, B, L, D) for these rows, optimised against their trajectories (through the
        denoiser's one UNet call site, ``GuidedUNet.conditional``)."""
        from ddim_worker.null_text import optimize_null_text

        text = self.encode_prompts([r.source_prompt for r in rows])
        uncond = self.encode_prompts([r.negative_prompt for r in rows])
        with torch.inference_mode(False):  # autograd needs tensors made outside inference mode
            trajectory = Trajectory(list(trajectories[0].timesteps),
                                    torch.cat([tr.latents for tr in trajectories], dim=1).clone().to(self.device))
            embeds, evals = optimize_null_text(
                self.guided_unet.conditional, trajectory, schedule, start_step, text.clone(), uncond.clone(),
                torch.tensor([float(r.guidance_scale) for r in rows]), iterations)
        return embeds.detach(), evals

    # -- the edit of one group, in numbered steps ----------------------------------------------------------------
    def _edit_group(self, rows: list[EditRow], num_steps: int, start_step: int, eta: float,
                    measure_fidelity: bool = False) -> list[EditOutput]:
        """Edit rows that share (n, s, eta): invert what is not stored, plan the sampling calls, sample, decode."""
        schedule = self.schedule(num_steps)
        work = [_RowWork() for _ in rows]
        # 1. Stored trajectories that reach tau[s] need no inversion; the others are inverted once per distinct key,
        #    now, or riding in the sampling calls' free rows (``riders``: leading row -> (guided, its rows)).
        riders = self._invert_unique(rows, work, schedule, start_step)
        # 2. null-text: per-step unconditional embeddings, optimised once per row and kept with the trajectory.
        uncond_steps = self._null_text(rows, work, schedule, start_step)
        # 3. Masks (mask auto): where the edit prompt changes the predictions, voted by the image's regions.
        self._find_masks(rows, work, schedule, start_step)
        # 4. Attention control per row (its token map), and the plan of the sampling calls.
        controls = [self.row_control(r) for r in rows]
        plan = plan_sampling([RowNeeds(float(r.guidance_scale) != 1.0, _source_key(r, c, eta))
                              for r, c in zip(rows, controls)], self.batch_size, riders)
        # 5. Sample every call of the plan: edit branches beside their source branches, held to the trajectories.
        x0 = self._sample_plan(plan, rows, work, controls, uncond_steps, schedule, start_step, eta)
        # 6. Decode and report.
        images = self.decode(x0)
        for i, w in enumerate(work):
            if w.mask is not None:  # outside the mask the pixels are the input's
                images[i] = M.paste_back(images[i], w.input_pixels, w.mask)
        # One copy off the device per trajectory: the edit rows of one image share theirs (step 1).
        handed = {id(w.trajectory): _to_cpu(w.trajectory, self.dtype) for w in work}
        outputs = [
            EditOutput(images[i], handed[id(w.trajectory)], w.inversion_passes, num_steps - start_step,
                       w.cache_hit,
                       w.shared, source_passes=w.source_passes, mask_passes=w.mask_passes,
                       attention_control=controls[i].tokens.kind if controls[i] is not None else "none",
                       mask=M.mask_image(w.mask) if w.mask is not None else None, latent=x0[i].float().cpu())
            for i, w in enumerate(work)
        ]
        # 7. Fidelity: each inversion resampled with its source prompt, compared with the input.
        if measure_fidelity:
            self._measure_fidelity(rows, work, outputs, uncond_steps, schedule, start_step, eta)
        return outputs

    def _invert_unique(self, rows: list[EditRow], work: list[_RowWork], schedule: Schedule,
                       start_step: int) -> dict[int, tuple[bool, list[int]]]:
        """Fill every row's trajectory up to tau[s]: stored ones as they are, the rest inverted once per distinct
        (image, source prompt, inversion settings); rows continuing a shallower stored trajectory start from its
        deepest level, the others from x0, in calls of their own."""
        target = schedule.label(start_step)
        todo: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            if row.cached is not None and target in row.cached.timesteps:
                work[i].trajectory, work[i].cache_hit = row.cached, True
            else:
                todo.setdefault(row.inversion_key(), []).append(i)
        riders = {members[0]: (float(rows[members[0]].inversion_guidance) != 1.0, members)
                  for members in todo.values() if self._can_ride(rows, members)}
        self._encode_riders(rows, work, riders)
        leaders = [members[0] for members in todo.values() if members[0] not in riders]
        from_levels = [schedule.level_of(rows[i].cached.deepest) if rows[i].cached is not None
                       else schedule.num_steps for i in leaders]
        guided = [float(rows[i].inversion_guidance) != 1.0 for i in leaders]
        for call in plan_inversions(leaders, from_levels, [rows[i].method.trajectory for i in leaders], guided,
                                    self.batch_size):
            self._run_inversion(call.rows, call.from_level, parse_method(call.method), rows, work, schedule,
                                start_step)
        for members in todo.values():
            if members[0] not in riders:
                self._share(work, members)
        self.stats.inversions += len(leaders) + len(riders)
        return riders

    def _can_ride(self, rows: list[EditRow], members: list[int]) -> bool:
        """Whether an inversion can run in the sampling calls' free rows: from x0, one evaluation a step, with a batch
        size (so there are free rows), and wanted by nothing before sampling (null-text, masks) but its own rows'
        sampling, in calls of its own kind (guided alike)."""
        lead = rows[members[0]]
        guided = float(lead.inversion_guidance) != 1.0
        return (self.batch_size is not None and self.batch_size >= 2 and lead.cached is None
                and lead.method.name != "noise" and lead.method.refine == 0 and all(
                    not rows[i].method.optimizes_null_text and rows[i].mask != "auto"
                    and (float(rows[i].guidance_scale) != 1.0) == guided for i in members))

    def _encode_riders(self, rows: list[EditRow], work: list[_RowWork], riders: dict[int, Any]) -> None:
        """The riders' x0 latents, encoded together (a one-level trajectory each until they have ridden)."""
        if not riders:
            return
        lead = list(riders)
        x0 = self.encode_images(self.preprocess([rows[i].image for i in lead]), [rows[i].seed for i in lead])
        for j, (i, (_, members)) in enumerate(riders.items()):
            work[i].x0, work[i].members = x0[j:j + 1], members

    @staticmethod
    def _share(work: list[_RowWork], members: list[int]) -> None:
        """The rows after the first of a shared inversion take its trajectory."""
        for i in members[1:]:
            work[i].trajectory, work[i].shared = work[members[0]].trajectory, True
            work[i].cache_hit = work[members[0]].cache_hit

    def _run_inversion(self, members: Sequence[int], from_level: int, method: InversionMethod, rows: list[EditRow],
                       work: list[_RowWork], schedule: Schedule, start_step: int) -> None:
        batch = [rows[i] for i in members]
        if from_level == schedule.num_steps:
            x = self.encode_images(self.preprocess([r.image for r in batch]), [r.seed for r in batch])
            prefix = None
        else:
            prefix = torch.cat([r.cached.latents for r in batch], dim=1)  # (L, B, C, h, w)
            x = prefix[-1]
        if method.name == "noise":
            new = self._forward_noise(x, [r.seed for r in batch], schedule, start_step)
            passes = 0
        else:
            new = self.invert(x, [r.source_prompt for r in batch], [r.negative_prompt for r in batch],
                              [r.inversion_guidance for r in batch], schedule.num_steps, start_step,
                              from_level=from_level, refine=method.refine)
            passes = (from_level - start_step) * (1 + method.refine)
        if prefix is not None:
            new = Trajectory(batch[0].cached.timesteps + new.timesteps[1:],
                             torch.cat([prefix.to(new.latents), new.latents[1:]]))
        # The levels in the engine's dtype (bf16 on a GPU): what is sampled from is exactly what the latent cache
        # stores, so a later edit from the cache gives the bytes a fresh inversion gives (fp32 on a CPU: unchanged).
        new = Trajectory(new.timesteps, new.latents.to(self.dtype).to(torch.float32), new.extras)
        for j, i in enumerate(members):
            work[i].trajectory, work[i].inversion_passes = new.rows([j]), passes
            work[i].cache_hit = prefix is not None

    def _null_text(self, rows: list[EditRow], work: list[_RowWork], schedule: Schedule,
                   start_step: int) -> dict[int, torch.Tensor]:
        """Per-step unconditional embeddings (n - s, L, D) by row, for the rows that invert with null-text; kept with
        the trajectory, so the latent cache makes a later edit of the same image skip the optimisation."""
        null_key = f"null_s{schedule.label(start_step)}"
        null_rows = [i for i, r in enumerate(rows) if r.method.optimizes_null_text]
        by_iterations: dict[int, list[int]] = {}
        for i in null_rows:
            if null_key not in work[i].trajectory.extras:
                by_iterations.setdefault(rows[i].method.param, []).append(i)
        for iterations, group in by_iterations.items():  # each row its own iteration count (null-text:K)
            for need in chunks(group, self.batch_size):
                embeds, evals = self._optimize_null_text([work[i].trajectory for i in need], [rows[i] for i in need],
                                                         schedule, start_step, iterations)
                for j, i in enumerate(need):
                    work[i].trajectory = work[i].trajectory.with_extra(null_key, embeds[:, j:j + 1].cpu())
                    work[i].inversion_passes += evals
        return {i: work[i].trajectory.extras[null_key][:, 0] for i in null_rows}

    def _find_masks(self, rows: list[EditRow], work: list[_RowWork], schedule: Schedule, start_step: int) -> None:
        """Masks for the rows with mask auto (``masks``): ``masks.DRAWS`` seeded noisings of the image's latent,
        predicted unguided under the edit prompt beside the source prompt (planned like sampling: one source branch
        per image, shared by its edits); the predictions' difference, in latents and decoded, then the image's
        regions vote."""
        index = [i for i, r in enumerate(rows) if r.mask == "auto"]
        if not index:
            return
        noisings = M.noisings(schedule.timesteps, int(self.scheduler_config.get("num_train_timesteps", 1000)))
        plan = plan_sampling([RowNeeds(False, rows[i].inversion_key()) for i in index], self.batch_size)
        latent_change: dict[int, torch.Tensor] = {}
        pixel_change: dict[int, np.ndarray] = {}
        charged: set[int] = set()
        for call in plan:
            branches = [(index[b.row], b) for b in call.branches]
            x0 = torch.cat([work[i].trajectory.at(sampler.CLEAN_TIMESTEP) for i, _ in branches])
            x0 = x0.to(self.device, torch.float32)
            prompts = [rows[i].source_prompt if b.is_source else rows[i].edit_prompt for i, b in branches]
            cond = self.conditioning(prompts, [rows[i].negative_prompt for i, _ in branches], [1.0] * len(branches))
            for level, seed in noisings:
                t, alpha = schedule.timesteps[level], float(schedule.alphas[level])
                noisy = sch.add_noise(x0, M.draw_noise(tuple(x0.shape[1:]), seed).to(x0), alpha)
                with torch.inference_mode():
                    eps = self.denoiser(noisy, t, cond)
                decoded = self.decode(sch.pred_original_sample(noisy, eps, alpha))
                edits = [(j, i, b.source) for j, (i, b) in enumerate(branches) if not b.is_source]
                for j, i, source in edits:
                    latent = M.change_map(eps[j:j + 1], eps[source:source + 1])[0].cpu() / M.DRAWS
                    pixel = M.pixel_change(decoded[j:j + 1], decoded[source:source + 1])[0] / M.DRAWS
                    latent_change[i] = latent_change[i] + latent if i in latent_change else latent
                    pixel_change[i] = pixel_change[i] + pixel if i in pixel_change else pixel
            for i, b in branches:
                if not b.is_source:
                    work[i].mask_passes += M.DRAWS
                elif i not in charged:  # one source prediction per image and noising
                    charged.add(i)
                    work[i].mask_passes += M.DRAWS
        pixels = self.input_pixels([rows[i].image for i in index])
        for k, i in enumerate(index):
            work[i].input_pixels = pixels[k]
            work[i].mask = M.region_mask(latent_change[i], pixel_change[i], pixels[k])
            work[i].latent_mask = M.latent_mask(work[i].mask, tuple(latent_change[i].shape))

    def input_pixels(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """The images as the engine sees them: uint8 (B, size, size, 3), resized and centre-cropped."""
        return ((self.preprocess(images) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def row_control(self, row: EditRow) -> RowControl | None:
        """The row's attention control (its token map from the two prompts), or None without control."""
        if not row.controlled:
            return None
        tokenizer = self.pipe.tokenizer
        length = tokenizer.model_max_length
        ids = [tokenizer(p, truncation=True, max_length=length).input_ids for p in (row.source_prompt,
                                                                                    row.edit_prompt)]
        return RowControl(float(row.cross_replace), float(row.self_replace), align_tokens(ids[0], ids[1], length),
                          float(row.edit_word_weight))

    def _sample_plan(self, plan: list[SamplingCall], rows: list[EditRow], work: list[_RowWork],
                     controls: list[RowControl | None], uncond_steps: dict[int, torch.Tensor], schedule: Schedule,
                     start_step: int, eta: float, use_source_prompt: bool = False) -> torch.Tensor:
        """Run every sampling call of ``plan``; x0 latents of the rows' edits, (len(rows), C, h, w).

        Each call: 1. its branches' starting latents (the trajectories at tau[s]); 2. their prompts (the source
        prompt on source branches); 3. the attention control and the trajectory guide of the call; 4. sample.
        """
        target = schedule.label(start_step)
        x0: torch.Tensor | None = None
        charged: set[int] = set()
        for call in plan:
            branches = call.branches
            start = torch.cat([work[b.row].trajectory.at(target) for b in branches] or [torch.empty(0, 0)])
            start = start.to(self.device, torch.float32)
            prompts = [rows[b.row].source_prompt if b.is_source or use_source_prompt else rows[b.row].edit_prompt
                       for b in branches]
            # negative-prompt inversion samples with the source prompt as the unconditional branch.
            uncond = [rows[b.row].method.unconditional_prompt(rows[b.row].source_prompt, rows[b.row].negative_prompt)
                      for b in branches]
            steps = {j: uncond_steps[b.row] for j, b in enumerate(branches) if b.row in uncond_steps}
            control = step_control([b.source for b in branches],
                                   [None if b.is_source else controls[b.row] for b in branches],
                                   schedule.num_steps - start_step)
            guide = self._guide(call, rows, work, schedule, start_step, use_masks=not use_source_prompt)
            args = (start, prompts, uncond, [rows[b.row].guidance_scale for b in branches], schedule.num_steps,
                    start_step, [rows[b.row].seed for b in branches], eta, steps)
            if call.riders:
                out = self._ride(call, rows, work, *args, control=control, callback=guide if guide.active else None)
                if not branches:
                    continue
            else:
                out = self.sample(*args, control=control, callback=guide if guide.active else None)
            if x0 is None:
                x0 = torch.empty((len(rows), *out.shape[1:]), dtype=out.dtype, device=out.device)
            for j, b in enumerate(branches):
                if not b.is_source:
                    x0[b.row] = out[j]
                elif b.row not in charged:  # one source branch per image: a split unit's copies are not ideal work
                    charged.add(b.row)
                    work[b.row].source_passes += schedule.num_steps - start_step
        assert x0 is not None, "a group has at least one row"
        return x0

    @torch.inference_mode()
    def _ride(self, call: SamplingCall, rows: list[EditRow], work: list[_RowWork], x: torch.Tensor,
              prompts: Sequence[str], negative_prompts: Sequence[str], guidance: Sequence[float], num_steps: int,
              start_step: int, seeds: Sequence[int], eta: float, uncond_steps: dict[int, torch.Tensor],
              control: CallControl | None, callback: Callback | None) -> torch.Tensor:
        """``sample`` of the call's branches with its riders inverting in the same UNet calls (one timestep per row):
        step k samples level s + k and inverts level n - k; each row's maths is its own, so the branches' bytes are
        what ``sample`` gives and the riders' are what ``invert`` gives, in calls of the same shape."""
        schedule, n, nb = self.schedule(num_steps), num_steps, x.shape[0]
        lead = list(call.riders)
        cond = self.conditioning(list(prompts) + [rows[i].source_prompt for i in lead],
                                 list(negative_prompts) + [rows[i].negative_prompt for i in lead],
                                 list(guidance) + [rows[i].inversion_guidance for i in lead])
        z = torch.cat([work[i].x0 for i in lead]).to(self.device, torch.float32)
        levels = [z]
        generators = [torch.Generator().manual_seed(int(s) + 1) for s in seeds] if eta > 0 else []
        for k in range(n - start_step):
            i = start_step + k
            uncond = cond.uncond
            if uncond_steps:
                uncond = uncond.clone()
                for row, embeds in uncond_steps.items():
                    uncond[row] = embeds[k].to(uncond)
            at = Conditioning(cond.text, uncond, cond.guidance, control.at(k) if control is not None else None)
            t = torch.tensor([schedule.timesteps[i]] * nb + [schedule.timesteps[n - 1 - k]] * len(lead))
            eps = self.denoiser(torch.cat([x, z]) if nb else z, t, at)
            if nb:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(self.device) \
                    if eta > 0 else None
                x = sch.ddim_step(x, eps[:nb], schedule.alphas[i], schedule.alphas[i + 1], eta=eta, noise=noise)
                if callback is not None:
                    replaced = callback({"x": x, "i": i, "t": schedule.timesteps[i], "eps": eps[:nb],
                                         "direction": "sample"})
                    x = x if replaced is None else replaced
            z = sch.inversion_step(z, eps[nb:], schedule.alphas[n - k], schedule.alphas[n - 1 - k])
            levels.append(z)
        labels = [schedule.label(level) for level in range(n, start_step - 1, -1)]
        new = Trajectory(labels, torch.stack(levels).to(self.dtype).to(torch.float32))
        for j, i in enumerate(lead):
            work[i].trajectory, work[i].inversion_passes, work[i].x0 = new.rows([j]), n - start_step, None
            self._share(work, work[i].members)
        return x

    def _guide(self, call: SamplingCall, rows: list[EditRow], work: list[_RowWork], schedule: Schedule,
               start_step: int, use_masks: bool = True) -> TrajectoryGuide:
        """What the call holds to the stored trajectories: direct inversion's source branches and their
        corrections, and the masked edits' outsides."""
        direct = [j for j, b in enumerate(call.branches) if b.is_source and rows[b.row].method.direct]
        corrected = tuple((j, b.source) for j, b in enumerate(call.branches)
                          if not b.is_source and b.source in direct and rows[b.row].method.direct)
        masks = {j: work[b.row].latent_mask.to(self.device) for j, b in enumerate(call.branches)
                 if use_masks and not b.is_source and work[b.row].latent_mask is not None}
        if not direct and not masks:
            return TrajectoryGuide(torch.empty(0), start_step)
        labels = [schedule.label(level) for level in range(start_step, schedule.num_steps + 1)]
        levels = torch.stack([torch.cat([work[b.row].trajectory.at(t) for b in call.branches]) for t in labels])
        blend_steps = replaced_steps(M.BLEND_FRACTION, schedule.num_steps - start_step)
        return TrajectoryGuide(levels.to(self.device, torch.float32), start_step, tuple(direct), corrected, masks,
                               blend_steps)

    def _measure_fidelity(self, rows: list[EditRow], work: list[_RowWork], outputs: list[EditOutput],
                          uncond_steps: dict[int, torch.Tensor], schedule: Schedule, start_step: int,
                          eta: float) -> None:
        """Resample each inversion with its *source* prompt and compare with the input: how faithful it was."""
        from ddim_worker.metrics import latent_mse, psnr, ssim

        plan = plan_sampling([RowNeeds(float(r.guidance_scale) != 1.0) for r in rows], self.batch_size)
        x0_rec = self._sample_plan(plan, rows, work, [None] * len(rows), uncond_steps, schedule, start_step, eta,
                                   use_source_prompt=True)
        reconstructions = self.decode(x0_rec)
        inputs = self.input_pixels([r.image for r in rows])
        for i, out in enumerate(outputs):
            out.reconstruction = reconstructions[i]
            out.psnr = psnr(inputs[i], reconstructions[i])
            out.ssim = ssim(inputs[i], reconstructions[i])
            out.latent_mse = latent_mse(out.trajectory.at(sampler.CLEAN_TIMESTEP)[0], x0_rec[i].cpu())
            out.sampling_passes += schedule.num_steps - start_step


@dataclass
class _RowWork:
    """What a group has worked out for one row so far."""

    trajectory: Trajectory | None = None
    inversion_passes: int = 0  # denoiser evaluations spent on its trajectory (0 when stored or shared)
    cache_hit: bool = False
    shared: bool = False  # its trajectory is an identical earlier row's
    source_passes: int = 0  # passes of the source branch it leads
    mask_passes: int = 0  # predictions spent finding its mask (and its image's source prediction, if it leads)
    mask: np.ndarray | None = None  # (H, W) bool: where its edit changes the image (mask auto)
    latent_mask: torch.Tensor | None = None  # (1, h, w) in [0, 1]: the mask's cover of each latent cell
    input_pixels: np.ndarray | None = None  # (H, W, 3) uint8: the input as the engine saw it
    x0: torch.Tensor | None = None  # (1, C, h, w): a riding inversion's start, until it has ridden
    members: list[int] = field(default_factory=list)  # a riding inversion's rows (itself first)


def _source_key(row: EditRow, control: RowControl | None, eta: float) -> tuple | None:
    """Rows with equal keys share one source branch: same trajectory and the same sampling of the source prompt.
    None: the row needs none (no attention control, no direct inversion)."""
    if not (row.method.direct or (control is not None and control.active)):
        return None
    method = row.method
    return row.inversion_key().source_key(row.guidance_scale, method.unconditional_prompt(row.source_prompt,
                                                                                           row.negative_prompt),
                                          method.direct, int(row.seed) if eta > 0 else None)


def _to_cpu(trajectory: Trajectory, dtype: torch.dtype) -> Trajectory:
    """A trajectory to hand on (the latent cache, the actor's memory): levels in the engine's ``dtype``, in which
    they are exact (see ``_run_inversion``), half the bytes of fp32 in bf16; extras (null-text embeddings) in fp32."""
    return Trajectory(list(trajectory.timesteps), trajectory.latents.detach().to("cpu", dtype),
                      {k: v.detach().to("cpu", torch.float32) for k, v in trajectory.extras.items()})
