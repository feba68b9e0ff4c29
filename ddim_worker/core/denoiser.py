"""The default denoiser: a UNet with classifier-free guidance, batched over rows with per-row prompts and scales.

A thin adapter (cf. k-diffusion's ``CompVisDenoiser``): the sampling loops only see ``eps = denoiser(x, t, cond)``.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch

from ddim_worker.core.attention_control import StepControl, controlled_attention


@dataclass
class Conditioning:
    """Per-row text conditioning for one batch.

    ``text`` and ``uncond`` are (B, L, D) prompt embeddings; ``guidance`` is (B,) float. Rows whose scale is 1 need only
    the text branch, but a batch that mixes them with guided rows still runs one doubled call: one UNet call per step.
    """

    text: torch.Tensor
    uncond: torch.Tensor
    guidance: torch.Tensor
    # Attention control of this call at this step (Prompt-to-Prompt), in the call's rows; None: plain attention.
    control: StepControl | None = None
    # The call's layout as planned (``call_plan``): rows per CFG half after padding, and whether it runs both halves.
    # None: worked out here (calls outside a plan: the engine's ``invert``/``sample``, a caller's own loop).
    pad_to: int | None = None
    doubled: bool | None = None

    @property
    def guided(self) -> bool:
        """Whether the call runs both CFG halves: the plan's word where it has one, else any row's scale != 1."""
        if self.doubled is not None:
            return self.doubled
        return bool((self.guidance != 1).any())

    def rows(self, index: torch.Tensor | list[int]) -> Conditioning:
        return Conditioning(self.text[index], self.uncond[index], self.guidance[index])

    def with_control(self, control: StepControl | None) -> Conditioning:
        return replace(self, control=control)


class GuidedUNet:
    """``eps = uncond + w * (text - uncond)`` from one UNet call on the doubled batch (one call, not two).

    The one place the engine calls the UNet: sampling and inversion through ``__call__``, null-text's optimisation
    through :meth:`conditional`. A call whose conditioning carries attention control runs with the control's
    processors installed for that call only (``attention_control.controlled_attention``).

    Counts its UNet calls (``calls``), the rows they carried (``row_passes``), the UNet samples they ran (``samples``:
    padding and the CFG doubling included) and how many calls ran at each batch size (``call_sizes``), so jobs and
    tests can report the work done. All are bounded for the life of an actor (a few distinct sizes, not a list).
    """

    def __init__(self, unet: torch.nn.Module, pad_to: int | None = None):
        self.unet = unet
        # Batch invariance: pad every call to ``pad_to`` rows per CFG half (and always run both halves), so a row's
        # output never depends on how many rows, or which, shared its call. Kernels pick algorithms by batch size.
        self.pad_to = pad_to
        self.calls = 0
        self.row_passes = 0
        self.samples = 0
        self.call_sizes: Counter[int] = Counter()

    def __call__(self, x: torch.Tensor, t: int | torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``t``: one timestep, or one per row (a call whose rows sit at different levels: inversions riding beside
        sampling, ``call_plan``)."""
        rows = x.shape[0]
        pad_to = cond.pad_to if cond.pad_to is not None else self.pad_to  # the plan's layout, where it has one
        if cond.doubled is False and bool((cond.guidance != 1).any()):
            raise ValueError("a call planned unguided carries rows with a guidance scale != 1")
        if pad_to is not None and rows < pad_to:
            x, cond = pad_rows(x, pad_to), replace(
                cond, text=pad_rows(cond.text, pad_to), uncond=pad_rows(cond.uncond, pad_to),
                guidance=pad_rows(cond.guidance, pad_to, value=1.0))
        # Doubled only when a row uses guidance: the engine puts guided and unguided rows in calls of their own, so
        # the call's shape (pad_to, or twice that) still depends on the row alone.
        guided = cond.guided
        dtype = self.unet.dtype
        if guided:
            model_input = torch.cat([x, x]).to(dtype)  # (2B, C, h, w): uncond rows first, as diffusers does
            context = torch.cat([cond.uncond, cond.text]).to(dtype)
        else:
            model_input, context = x.to(dtype), cond.text.to(dtype)
        if isinstance(t, torch.Tensor):
            per_row = pad_rows(t.to(x.device, torch.long).view(-1), x.shape[0])
            timestep = torch.cat([per_row, per_row]) if guided else per_row
        else:
            timestep = torch.full((model_input.shape[0],), t, device=x.device, dtype=torch.long)
        kwargs: dict[str, Any] = {}
        if cond.control is not None:
            kwargs["cross_attention_kwargs"] = {"control": cond.control.over_unet_batch(
                x.shape[0], guided, context.shape[1], x.device)}
        with controlled_attention(self.unet) if kwargs else nullcontext():
            out = self.unet(model_input, timestep, encoder_hidden_states=context, return_dict=False, **kwargs)[0]
        self._count(rows, model_input.shape[0])
        if not guided:
            return out[:rows].to(x.dtype)
        eps_uncond, eps_text = out.float().chunk(2)
        w = cond.guidance.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        eps = eps_uncond + w * (eps_text - eps_uncond)
        if pad_to is not None:  # w = 1 rows: exactly the text branch, as in an unguided call
            eps = torch.where(w == 1, eps_text, eps)
        return eps[:rows].to(x.dtype)

    def conditional(self, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        """One unguided, unpadded prediction ``eps(x, t, context)``, differentiable in ``context`` outside inference
        mode (null-text inversion optimises the unconditional embedding through it)."""
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.unet(x.to(self.unet.dtype), timestep, encoder_hidden_states=context.to(self.unet.dtype),
                        return_dict=False)[0]
        self._count(x.shape[0], x.shape[0])
        return out

    def _count(self, rows: int, samples: int) -> None:
        self.calls += 1
        self.row_passes += rows
        self.samples += samples
        self.call_sizes[samples] += 1


def pad_rows(tensor: torch.Tensor, rows: int, value: float = 0.0) -> torch.Tensor:
    """``tensor`` with rows of ``value`` appended up to ``rows`` (dimension 0)."""
    extra = rows - tensor.shape[0]
    return torch.cat([tensor, tensor.new_full((extra, *tensor.shape[1:]), value)]) if extra > 0 else tensor
