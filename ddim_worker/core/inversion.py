"""Inversion methods by name: ``ddim``, ``pnp``, ``direct``, ``negative-prompt``, ``fixed-point:K``,
``null-text:ITERS``, ``noise``.

The trajectory's name is part of the latent-cache key: two methods that invert differently give two trajectories for
the same image. ``pnp`` and ``direct`` invert exactly as ``ddim`` does, so they share ``ddim``'s cached trajectory;
they differ while sampling. Both hold the source branch on that trajectory at every step. ``pnp`` is PnP Inversion as
Ju et al. (2023) publish it: only the source branch is corrected, and the edit branch gains from it through attention
control (it reads the source's attention). ``direct`` is that paper's "add-source" ablation, ours since before
``pnp``: the source's correction is also added to the edit branch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

METHODS = ("ddim", "pnp", "direct", "negative-prompt", "fixed-point", "null-text", "noise")
#: How each method is spelt with its parameter, for messages.
SPELLINGS = ", ".join({"fixed-point": "fixed-point:K", "null-text": "null-text:ITERS"}.get(m, m) for m in METHODS)


@dataclass(frozen=True)
class InversionMethod:
    name: str  # one of METHODS
    param: int = 0  # K refinement evaluations per step (fixed-point), optimiser iterations per step (null-text)

    @property
    def refine(self) -> int:
        return self.param if self.name == "fixed-point" else 0

    @property
    def trajectory(self) -> str:
        """The name of the trajectory it inverts to: ``pnp`` and ``direct`` invert as ``ddim`` does (one cached
        trajectory)."""
        return "ddim" if self.pins_source else str(self)

    @property
    def pins_source(self) -> bool:
        """``pnp`` and ``direct``: the source branch is put back on the stored trajectory at every sampling step."""
        return self.name in ("pnp", "direct")

    @property
    def adds_source_correction(self) -> bool:
        """``direct`` (the add-source ablation): the source branch's correction is added to the edit branch too."""
        return self.name == "direct"

    @property
    def source_as_uncond(self) -> bool:
        """negative-prompt inversion: sample with the source embedding in place of the unconditional one."""
        return self.name == "negative-prompt"

    @property
    def optimizes_null_text(self) -> bool:
        """null-text: per-step unconditional embeddings, optimised (``param`` iterations per step) and cached."""
        return self.name == "null-text"

    @property
    def caches(self) -> bool:
        """Whether its trajectory is worth a latent-cache entry: ``noise`` draws fresh seeded noise, nothing to keep."""
        return self.name != "noise"

    def unconditional_prompt(self, source_prompt: str, negative_prompt: str) -> str:
        """The prompt of the unconditional branch while sampling."""
        return source_prompt if self.source_as_uncond else negative_prompt

    def cache_key(self, guidance_scale: float) -> str:
        """The method's part of a latent-cache key. null-text's embeddings are optimised for one sampling guidance
        scale, so the scale joins its key; every other method's trajectory does not depend on sampling."""
        return f"{self}@guidance={float(guidance_scale)}" if self.optimizes_null_text else self.trajectory

    def __str__(self) -> str:
        return f"{self.name}:{self.param}" if self.name in ("fixed-point", "null-text") else self.name


@lru_cache(maxsize=256)
def parse_method(text: str) -> InversionMethod:
    """``"fixed-point:3"`` -> InversionMethod("fixed-point", 3); unknown names fail listing the valid ones."""
    name, _, param = str(text).strip().partition(":")
    if name not in METHODS:
        raise ValueError(f"inversion method {text!r} is not one of: {SPELLINGS}")
    if name == "fixed-point":
        if not param.isdigit() or not 1 <= int(param) <= 20:
            raise ValueError(f"fixed-point needs K refinement evaluations per step in [1, 20], e.g. "
                             f"'fixed-point:3'; got {text!r}")
        return InversionMethod(name, int(param))
    if name == "null-text":
        if not param.isdigit() or not 1 <= int(param) <= 200:
            raise ValueError(f"null-text needs optimiser iterations per step in [1, 200], e.g. 'null-text:10'; "
                             f"got {text!r}")
        return InversionMethod(name, int(param))
    if param:
        raise ValueError(f"inversion method {name!r} takes no parameter, got {text!r}")
    return InversionMethod(name)
