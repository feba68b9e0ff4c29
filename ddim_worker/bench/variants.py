"""Each fast-path switch flipped from the main configuration: channels_last, the attention kernel, CFG in one doubled
UNet call or two calls (``TwoCallCFG``), ``torch.compile``, and on CUDA the other dtypes."""

from __future__ import annotations

from typing import Any

import torch

from ddim_worker.core import fastpath
from ddim_worker.bench.config import BenchConfig
from ddim_worker.bench.timers import dtype_name
from ddim_worker.core.denoiser import Conditioning, GuidedUNet
from ddim_worker.core.engine import EditEngine, EditRow


class TwoCallCFG(GuidedUNet):
    """Classifier-free guidance as two UNet calls per step (unconditional, then text): the "off" measurement of the
    engine's one doubled call. Counts like ``GuidedUNet``: ``row_passes`` are guided evaluations of a row."""

    def __call__(self, x: torch.Tensor, t: int, cond: Conditioning) -> torch.Tensor:
        if not cond.guided:
            return super().__call__(x, t, cond)
        dtype = self.unet.dtype
        model_input = x.to(dtype)
        timestep = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps_uncond = self.unet(model_input, timestep, encoder_hidden_states=cond.uncond.to(dtype),
                               return_dict=False)[0].float()
        eps_text = self.unet(model_input, timestep, encoder_hidden_states=cond.text.to(dtype),
                             return_dict=False)[0].float()
        self.calls += 2
        self.row_passes += x.shape[0]
        self.samples += 2 * x.shape[0]
        self.call_sizes[x.shape[0]] += 2
        w = cond.guidance.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
        return (eps_uncond + w * (eps_text - eps_uncond)).to(x.dtype)


def measure_variants(cfg: BenchConfig, engine: EditEngine, variant_rows: list[EditRow], model: str,
                     dtype: torch.dtype, main_fast: dict, measure: Any) -> None:
    """Measure each fast-path switch flipped from the main configuration (``main_fast``, as
    ``fastpath.apply_fast_path`` returned it), on ``variant_rows`` in one batch (compare with the batch-size line of
    that many rows). ``measure(name, engine, rows, batch, counter=None, **info)`` times and records one."""
    if not cfg.variants:
        return
    device = engine.device
    B = min(cfg.batch_size, len(variant_rows))
    keys = ("attention", "channels_last", "compile_unet")
    measured = [dict(main_fast)]

    def flipped(**change: Any) -> None:
        fast = {**main_fast, **change}
        if any(all(fast[k] == m[k] for k in keys) for m in measured):
            return  # the main configuration itself
        label = ", ".join(f"{k} {'on' if v is True else 'off' if v is False else v}" for k, v in change.items())
        measure(label, engine, variant_rows, B, **fastpath.apply_fast_path(engine.pipe, **fast))
        measured.append(fast)
        fastpath.apply_fast_path(engine.pipe, **main_fast)

    flipped(channels_last=not main_fast["channels_last"])
    flipped(attention="math" if main_fast["attention"] == "sdpa" else "sdpa")
    if main_fast["compile_unet"]:
        flipped(compile_unet=False)

    # CFG as two UNet calls per step instead of one doubled call.
    split = TwoCallCFG(engine.pipe.unet)
    split_engine = EditEngine(engine.pipe, size=engine.size, denoiser=split, fingerprint=engine.fingerprint)
    measure("CFG split in 2 calls", split_engine, variant_rows, B, counter=split, **main_fast)

    # Other dtypes (CUDA): each its own pipeline, with the main fast path but eager (compiling again costs minutes).
    if device.type == "cuda":
        for other in (torch.bfloat16, torch.float16, torch.float32):
            if other == dtype or (other == torch.bfloat16 and not torch.cuda.is_bf16_supported()):
                continue
            eng = EditEngine.from_pretrained(model, device=str(device), dtype=dtype_name(other), size=engine.size)
            fast = fastpath.apply_fast_path(eng.pipe, channels_last=main_fast["channels_last"], compile_unet=False,
                                            attention=main_fast["attention"])
            measure(f"dtype {dtype_name(other)}", eng, variant_rows, B, **fast)
            del eng
            torch.cuda.empty_cache()
