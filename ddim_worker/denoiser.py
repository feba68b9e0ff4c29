"""The default denoiser: a UNet with classifier-free guidance, batched over rows with per-row prompts and scales.

A thin adapter (cf. k-diffusion's ``CompVisDenoiser``): the sampling loops only see ``eps = denoiser(x, t, cond)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Conditioning:
    """Per-row text conditioning for one batch.

    ``text`` and ``uncond`` are (B, L, D) prompt embeddings; ``guidance`` is (B,) float. Rows whose scale is 1 need only
    the text branch, but a batch that mixes them with guided rows still runs one doubled call: one UNet call per step.
    """

    text: torch.Tensor
    uncond: torch.Tensor
    guidance: torch.Tensor

    @property
    def guided(self) -> bool:
        return bool((self.guidance != 1).any())

    def rows(self, index: torch.Tensor | list[int]) -> Conditioning:
        return Conditioning(self.text[index], self.uncond[index], self.guidance[index])


class GuidedUNet:
    """``eps = uncond + w * (text - uncond)`` from one UNet call on the doubled batch (one call, not two).

    Counts its UNet calls (``calls``) and the rows they carried (``row_passes``) so jobs and tests can report the work
    done; ``batch_sizes`` keeps the batch size of every call.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.calls = 0
        self.row_passes = 0
        self.batch_sizes: list[int] = []

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        dtype = self.unet.dtype
        if cond.guided:
            model_input = torch.cat([x, x]).to(dtype)  # (2B, C, h, w): uncond rows first, as diffusers does
            context = torch.cat([cond.uncond, cond.text]).to(dtype)
        else:
            model_input, context = x.to(dtype), cond.text.to(dtype)
        timestep = torch.full((model_input.shape[0],), t, device=x.device, dtype=torch.long)
        out = self.unet(model_input, timestep, encoder_hidden_states=context, return_dict=False)[0]
        self.calls += 1
        self.row_passes += x.shape[0]
        self.batch_sizes.append(model_input.shape[0])
        if not cond.guided:
            return out.to(x.dtype)
        eps_uncond, eps_text = out.float().chunk(2)
        w = cond.guidance.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        return (eps_uncond + w * (eps_text - eps_uncond)).to(x.dtype)
