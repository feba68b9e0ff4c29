"""Timing: the engine batch by batch (``EngineTimer``), the textbook loop edit by edit (``TextbookTimer``), warm-up,
and what the job moves off the engine's critical path (PNG encoding, VAE decode) or could (pinned host memory)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch

from ddim_worker.core import fastpath
from ddim_worker.bench.textbook import TextbookEditor
from ddim_worker.core.denoiser import GuidedUNet
from ddim_worker.core.engine import EditEngine, EditOutput, EditRow

log = logging.getLogger("ddim_edit.benchmark")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def split_batches(rows: list, size: int) -> list[list]:
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def warm_up(engine: EditEngine, rows: list[EditRow], batch_size: int) -> float:
    """Run each distinct batch shape once with 2 steps (kernels chosen, threads spun up, compiled graphs built);
    returns the seconds it took (the compile time, with ``torch.compile``)."""
    batches = split_batches(rows, batch_size)
    shapes = [batches[0]] + ([batches[-1]] if len(batches[-1]) != len(batches[0]) else [])
    started = time.perf_counter()
    for chunk in shapes:
        engine.edit([replace(r, num_steps=2, start_step=1, cached=None) for r in chunk])
    sync(engine.device)
    return time.perf_counter() - started


def rates(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(best, overall) rows/s: the fastest full-size batch, and all rows over all the time.

    This machine's cores may be shared: a burst of other work slows whichever batch it hits. The fastest batch is the
    least disturbed, so every rate and ratio the benchmark reports uses it (the job's too: its fastest interval
    between two batches); the overall rates are in the JSON as ``*_all`` (and equal the best on a quiet machine)."""
    full = max(sizes)
    best = max(n / t for n, t in zip(sizes, seconds) if n == full)
    return best, sum(sizes) / sum(seconds)


class EngineTimer:
    """Times ``engine.edit`` batch by batch and counts what each batch did (UNet calls and passes, inversions, cache
    hits). Counts are taken per batch, so timers that share an engine can be interleaved (``step`` by ``step``)."""

    def __init__(self, engine: EditEngine, rows: list[EditRow], batch_size: int, name: str,
                 counter: GuidedUNet | None = None, **info: Any):
        self.engine, self.batch_size, self.name, self.info = engine, batch_size, name, info
        self.counter = counter or engine.guided_unet
        self.rows = rows
        self.pending = split_batches(rows, batch_size)
        self.outputs: list[EditOutput] = []
        self.sizes: list[int] = []
        self.times: list[float] = []
        self.calls = self.passes = self.samples = self.inversions = 0
        self.peak_memory = 0
        self.warm_s = 0.0

    def warm_up(self) -> EngineTimer:
        self.warm_s = warm_up(self.engine, self.rows, self.batch_size)
        return self

    @property
    def done(self) -> bool:
        return not self.pending

    def step(self, chunk: list[EditRow] | None = None) -> list[EditOutput]:
        """Edit the next batch (or ``chunk``, for rows built from another timer's outputs), timed."""
        chunk = self.pending.pop(0) if chunk is None else chunk
        counter, engine, device = self.counter, self.engine, self.engine.device
        calls, passes, samples, inversions = (counter.calls, counter.row_passes, counter.samples,
                                              engine.stats.inversions)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        started = time.perf_counter()
        outputs = engine.edit(chunk)
        sync(device)
        self.times.append(time.perf_counter() - started)
        self.sizes.append(len(chunk))
        self.calls += counter.calls - calls
        self.passes += counter.row_passes - passes
        self.samples += counter.samples - samples
        self.inversions += engine.stats.inversions - inversions
        if device.type == "cuda":
            self.peak_memory = max(self.peak_memory, int(torch.cuda.max_memory_allocated(device)))
        self.outputs.extend(outputs)
        return outputs

    def run(self) -> EngineTimer:
        while not self.done:
            self.step()
        return self

    def record(self) -> dict:
        best, overall = rates(self.sizes, self.times)
        rows = sum(self.sizes)
        record = {
            "name": self.name, "batch_size": self.batch_size, "rows": rows, "seconds": round(sum(self.times), 4),
            "batch_seconds": [round(t, 4) for t in self.times],
            "edits_per_s": best,
            "edits_per_s_all": overall,
            "seconds_per_edit": 1 / best,
            "unet_calls": self.calls,
            "unet_passes": self.passes,  # guided (CFG) evaluations of one row: 2 (n - s) per edit
            "unet_samples": self.samples,  # rows through the UNet (2 per pass with CFG)
            "unet_passes_per_edit": self.passes / rows,
            "unet_passes_per_s": best * self.passes / rows,
            "unet_samples_per_s": best * self.samples / rows,
            "inversions": self.inversions,
            "rows_inverted": sum(1 for o in self.outputs if o.inversion_passes > 0),
            "inversion_passes": sum(o.inversion_passes for o in self.outputs),
            "sampling_passes": sum(o.sampling_passes for o in self.outputs),
            "cache_hits": sum(1 for o in self.outputs if o.cache_hit),
            "warmup_seconds": round(self.warm_s, 3),
            **self.info,
        }
        if self.peak_memory:
            record["peak_memory_bytes"] = self.peak_memory
        log.info("%-30s batch %-3d %2d rows: %7.3f edits/s (all batches %.3f)  %8.2f UNet passes/s  %5.1f "
                 "passes/edit", self.name, self.batch_size, rows, best, overall, record["unet_passes_per_s"],
                 record["unet_passes_per_edit"])
        return record


def time_edits(engine: EditEngine, rows: list[EditRow], batch_size: int, name: str,
               counter: GuidedUNet | None = None, **info: Any) -> tuple[dict, list[EditOutput]]:
    """Edit ``rows`` in batches of ``batch_size`` after a warm-up; edits/s, UNet passes and what the rows report."""
    timer = EngineTimer(engine, rows, batch_size, name, counter, **info).warm_up().run()
    return timer.record(), timer.outputs


class TextbookTimer:
    """Times the textbook loop edit by edit (it has no batches), counting its UNet calls and prompt encodings."""

    def __init__(self, editor: TextbookEditor, rows: list[EditRow], seed: int = 0):
        self.editor, self.rows, self.seed = editor, rows, seed
        self.pending = list(rows)
        self.generator = torch.Generator(device=editor.device)
        self.times: list[float] = []
        self.calls = self.encodings = 0

    def warm_up(self) -> TextbookTimer:
        """One short edit (kernels chosen, threads spun up), as for the engine."""
        row = self.rows[0]
        self.editor.edit(row.image, row.source_prompt, row.edit_prompt, num_steps=4, start_step=1,
                         guidance_scale=row.guidance_scale, generator=self.generator.manual_seed(self.seed))
        return self

    @property
    def done(self) -> bool:
        return not self.pending

    def step(self) -> None:
        row, editor = self.pending.pop(0), self.editor
        calls, encodings = editor.unet_calls, editor.text_encodings
        sync(editor.device)
        started = time.perf_counter()
        editor.edit(row.image, row.source_prompt, row.edit_prompt, num_steps=row.num_steps, start_step=row.start_step,
                    guidance_scale=row.guidance_scale, generator=self.generator.manual_seed(row.seed))
        sync(editor.device)
        self.times.append(time.perf_counter() - started)
        self.calls += editor.unet_calls - calls
        self.encodings += editor.text_encodings - encodings

    def record(self) -> dict:
        best, overall = rates([1] * len(self.times), self.times)
        rows, passes = len(self.times), self.calls  # batch 1: each call is one CFG-doubled pass of one row
        record = {
            "name": "textbook loop", "batch_size": 1, "rows": rows, "seconds": round(sum(self.times), 4),
            "batch_seconds": [round(t, 4) for t in self.times],
            "edits_per_s": best, "edits_per_s_all": overall, "seconds_per_edit": 1 / best,
            "unet_calls": passes, "unet_passes": passes, "unet_samples": 2 * passes,
            "unet_passes_per_edit": passes / rows, "unet_passes_per_s": best * passes / rows,
            "unet_samples_per_s": best * 2 * passes / rows,
            "text_encodings_per_edit": self.encodings / rows,
            "dtype": dtype_name(self.editor.pipe.unet.dtype),
        }
        log.info("%-30s batch 1   %2d rows: %7.3f edits/s (all %.3f)  %8.2f UNet passes/s  %5.1f passes/edit",
                 "textbook loop", rows, best, overall, record["unet_passes_per_s"], record["unet_passes_per_edit"])
        return record


def time_offload(engine: EditEngine, outputs: list[EditOutput], batch_size: int) -> dict:
    """What the job takes off the engine's critical path: PNG encoding (the job's write stage, overlapped with the
    next batch by Ray Data) and what it could: the VAE decode (still inside ``engine.edit``)."""
    from ddim_worker.core.images import encode_png

    side = engine.size // engine.pipe.vae_scale_factor
    latents = torch.zeros(batch_size, 4, side, side, device=engine.device)
    engine.decode(latents)  # warm-up
    sync(engine.device)
    started = time.perf_counter()
    engine.decode(latents)
    sync(engine.device)
    decode_s = (time.perf_counter() - started) / batch_size
    started = time.perf_counter()
    for out in outputs[:batch_size]:
        encode_png(out.image, {"ddim_edit:id": "x", "ddim_edit:edit_prompt": "benchmark"})
    png_s = (time.perf_counter() - started) / len(outputs[:batch_size])
    return {"vae_decode_s_per_row": decode_s, "png_encode_s_per_row": png_s}


def time_pinned(device: torch.device, size: int, batch_size: int, reps: int = 10) -> dict | None:
    """Host-to-device copies of a batch of preprocessed images (float32, as ``engine.preprocess`` makes them and
    ``encode_images`` copies them) from pageable vs pinned memory."""
    if device.type != "cuda":
        return None
    host = torch.rand(batch_size, 3, size, size)
    out = {"bytes": host.numel() * host.element_size()}
    for name, copy in (("pageable", lambda: host.to(device)),
                       ("pinned", lambda: fastpath.pinned_to_device(host, device))):
        copy()
        sync(device)
        started = time.perf_counter()
        for _ in range(reps):
            copy()
        sync(device)
        seconds = (time.perf_counter() - started) / reps
        out[f"{name}_s"] = seconds
        out[f"{name}_gb_per_s"] = out["bytes"] / seconds / 1e9
    pinned_host = host.pin_memory()  # the buffer reused, as a job's pinned staging buffer would be
    started = time.perf_counter()
    for _ in range(reps):
        pinned_host.to(device, non_blocking=True)
    sync(device)
    out["pinned_reused_s"] = (time.perf_counter() - started) / reps
    out["pinned_reused_gb_per_s"] = out["bytes"] / out["pinned_reused_s"] / 1e9
    return out
