"""Inversion methods by name: ``ddim``, ``negative-prompt``, ``fixed-point:K``, ``null-text:ITERS``, ``noise``.

The name is part of the latent-cache key: two methods give two different trajectories for the same image.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ddim", "negative-prompt", "fixed-point", "null-text", "noise")


@dataclass(frozen=True)
class InversionMethod:
    name: str  # one of METHODS
    param: int = 0  # K refinement evaluations per step (fixed-point), optimiser iterations per step (null-text)

    @property
    def refine(self) -> int:
        return self.param if self.name == "fixed-point" else 0

    @property
    def source_as_uncond(self) -> bool:
        """negative-prompt inversion: sample with the source embedding in place of the unconditional one."""
        return self.name == "negative-prompt"

    def __str__(self) -> str:
        return f"{self.name}:{self.param}" if self.name in ("fixed-point", "null-text") else self.name


def parse_method(text: str) -> InversionMethod:
    """``"fixed-point:3"`` -> InversionMethod("fixed-point", 3); unknown names fail listing the valid ones."""
    name, _, param = str(text).strip().partition(":")
    if name not in METHODS:
        raise ValueError(f"inversion method {text!r} is not one of: ddim, negative-prompt, fixed-point:K, "
                         "null-text:ITERS, noise")
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
