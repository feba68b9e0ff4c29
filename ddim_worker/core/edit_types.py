"""What the engine takes and hands back, and what a group works out per row: pure data, no model.

``EditRow`` (one edit: image, prompts, settings), ``EditOutput`` (its result), ``RowWork`` (what a group has worked
out for a row so far), the settings check ``validate_settings`` and the keys that decide what rows share.
``ddim_worker.core.engine`` re-exports the public names.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from ddim_worker.core.call_plan import RowNeeds
from ddim_worker.core.candidates import KeptCandidate, Scores
from ddim_worker.core.inversion import InversionMethod, parse_method
from ddim_worker.core.inversion_key import InversionKey
from ddim_worker.core.settings import DEFAULTS, SETTING_NAMES, EditSettings, SettingError, sampling_start

if TYPE_CHECKING:  # annotations only: the CPU stages that pack rows into calls import this without torch
    import torch

    from ddim_worker.core.sampler import Trajectory


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
    control_rules: str = DEFAULTS.control_rules  # reference (google/prompt-to-prompt's definitions) | every-layer
    candidates: int = DEFAULTS.candidates  # the engine edits a row as given; the job draws its candidates
    sample_cross_replace: str = DEFAULTS.sample_cross_replace
    sample_self_replace: str = DEFAULTS.sample_self_replace
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
        """The level sampling starts from: the start step, or deeper with mask auto (``settings.sampling_start``: what
        the mask keeps is blended back and pasted, so the region it frees can be regenerated more)."""
        return sampling_start(int(self.start_step)) if self.mask == "auto" else int(self.start_step)

    @property
    def controlled(self) -> bool:
        """Whether the row reads a source branch's attention (Prompt-to-Prompt)."""
        return float(self.cross_replace) > 0 or float(self.self_replace) > 0

    @property
    def method(self) -> InversionMethod:
        """The parsed inversion method (parsed once per distinct spelling)."""
        return parse_method(self.inversion)

    @property
    def guided(self) -> bool:
        """Whether the row's sampling runs both CFG halves (guidance scale != 1)."""
        return float(self.guidance_scale) != 1.0

    @property
    def group(self) -> tuple[int, int, float]:
        """Rows with equal groups are planned and sampled together: (steps, the level sampling starts from, eta)."""
        return int(self.num_steps), self.sampling_start, float(self.eta)

    def inversion_key(self) -> InversionKey:
        """Rows with equal keys invert to the same trajectory, so a batch inverts them once (``inversion_key``)."""
        return InversionKey.of(pixels_digest(self.image), self.source_prompt, self.negative_prompt, self.num_steps,
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
    # Candidates (``core.candidates``; the job's actor fills these): which of the row's candidates this is, the
    # control fractions it used, its CLIP scores and whether it passed the filter (no scorer: True).
    candidate: int = 0
    cross_replace: float | None = None
    self_replace: float | None = None
    scores: Scores | None = None
    passed: bool = True
    kept_candidates: tuple[KeptCandidate, ...] = ()  # every candidate of the row (--keep-candidates)


@dataclass
class Stats:
    edits: int = 0
    inversions: int = 0
    prompt_encodings: int = 0


@dataclass
class RowWork:
    """What a group has worked out for one row so far."""

    trajectory: Trajectory | None = None
    null_text_passes: int = 0  # null-text's optimiser evaluations for it (the plan charges the rest)
    cache_hit: bool = False
    shared: bool = False  # its trajectory is an identical earlier row's
    mask: np.ndarray | None = None  # (H, W) bool: where its edit changes the image (mask auto)
    latent_mask: torch.Tensor | None = None  # (1, h, w) in [0, 1]: the mask's cover of each latent cell
    input_pixels: np.ndarray | None = None  # (H, W, 3) uint8: the input as the engine saw it
    x0: torch.Tensor | None = None  # (1, C, h, w): a riding inversion's start, until it has ridden
    members: list[int] = field(default_factory=list)  # a riding inversion's rows (itself first)


def pixels_digest(image: Image.Image | np.ndarray) -> str:
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


def source_key(row: EditRow, key: InversionKey | None = None) -> Hashable | None:
    """Rows with equal keys share one source branch: same trajectory and the same sampling of the source prompt.
    None: the row needs none (no attention control and no ``direct`` correction: ``pnp`` without control reads
    nothing of a source, so it samples none); ``pnp`` and ``direct`` hold theirs on the trajectory. ``key``: the
    row's inversion key, where its image is not read yet (the job packs rows into tasks before fetching them)."""
    method = row.method
    if not (method.adds_source_correction or row.controlled):  # an uncontrolled pnp edit reads no source
        return None
    return (key or row.inversion_key()).source_key(row.guidance_scale,
                                                   method.unconditional_prompt(row.source_prompt, row.negative_prompt),
                                                   method.pins_source, int(row.seed) if float(row.eta) > 0 else None)


def call_needs(row: EditRow, key: InversionKey | None = None) -> RowNeeds:
    """What the call planner reads of a row: whether its calls are guided, and the source branch it shares."""
    return RowNeeds(row.guided, source_key(row, key))
