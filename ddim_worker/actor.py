"""The Ray Data callable class: loads the engine once, edits batches. Thin on purpose: no maths, no storage.

Used as ``ds.map_batches(EditActor, compute=ActorPoolStrategy(size=N), num_gpus=G, fn_constructor_kwargs=...)``;
resources are set there, at the call site. Rows that failed upstream pass through untouched; a batch that fails in
the engine is retried row by row, so one poisoned row fails alone (``engine_error``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ddim_worker.engine import EditEngine, EditRow
from ddim_worker.failpoints import failpoint
from ddim_worker.fastpath import apply_fast_path
from ddim_worker.fetch import ensure_worker_logging
from ddim_worker.inversion import parse_method
from ddim_worker.latent_cache import decode_trajectory, encode_trajectory_blob
from ddim_worker.rows import FAILED, PENDING
from ddim_worker.settings import EngineSettings

log = logging.getLogger(__name__)

#: Trajectories an actor keeps in memory, by latent-cache key: the next batches of rows of the same image (sorted
#: next to each other by the manifest stage) reuse them before the cache write of the first is even visible.
TRAJECTORIES_KEPT = 64


class EditActor:
    def __init__(self, model: str, engine: EngineSettings, batch_size: int, device: str = "auto",
                 storage_options: dict | None = None, num_threads: int | None = None,
                 measure_fidelity: bool = False, revision: str | None = None, variant: str | None = None,
                 cache_latents: bool = True):
        ensure_worker_logging()
        if num_threads:
            torch.set_num_threads(num_threads)  # the cores Ray gave this actor, not every core of the node
        # A fixed engine batch size makes every row's output independent of its neighbours (see EditEngine).
        self.engine = EditEngine.from_pretrained(model, device=device, dtype=engine.dtype, size=engine.size,
                                                 storage_options=storage_options, batch_size=batch_size,
                                                 revision=revision, variant=variant)
        # The same switches the benchmark measures; with a fixed batch size a compiled UNet sees one shape.
        apply_fast_path(self.engine.pipe, attention=engine.attention, channels_last=engine.channels_last,
                        compile_unet=engine.compile_unet)
        self.measure_fidelity = measure_fidelity
        self.cache_latents = cache_latents  # --latent-cache off: no trajectory is encoded for the write stage
        self.dtype = str(self.engine.dtype).removeprefix("torch.")  # what this actor really runs, reported per row
        self._recent: OrderedDict[str, Any] = OrderedDict()

    def _row(self, batch: dict[str, np.ndarray], i: int) -> EditRow:
        blob = batch["cache_blob"][i]
        return EditRow(
            image=batch["pixels"][i], source_prompt=str(batch["source_prompt"][i]),
            edit_prompt=str(batch["edit_prompt"][i]), negative_prompt=str(batch["negative_prompt"][i] or ""),
            num_steps=int(batch["num_steps"][i]), start_step=int(batch["start_step"][i]),
            guidance_scale=float(batch["guidance_scale"][i]),
            inversion_guidance=float(batch["inversion_guidance"][i]), seed=int(batch["seed"][i]),
            eta=float(batch["eta"][i]),
            inversion=str(batch["inversion"][i]),
            cross_replace=float(batch["cross_replace"][i]), self_replace=float(batch["self_replace"][i]),
            edit_word_weight=float(batch["edit_word_weight"][i]), mask=str(batch["mask"][i]),
            cached=self._cached(blob) or self._recent.get(str(batch["cache_uri"][i] or "")),
        )

    @staticmethod
    def _cached(blob: Any) -> Any:
        if blob is None or not len(blob):
            return None
        try:
            return decode_trajectory(bytes(blob))
        except Exception as exc:  # noqa: BLE001 - a corrupt cache entry is a miss; the write stage replaces it
            log.warning("ignoring unreadable latent-cache entry: %s", exc)
            return None

    def _edit_rows(self, batch: dict[str, np.ndarray], index: list[int]) -> dict[int, Any]:
        """Outputs by row, or the exception for rows that fail even alone."""
        try:
            rows = [self._row(batch, i) for i in index]
            return dict(zip(index, self.engine.edit(rows, measure_fidelity=self.measure_fidelity)))
        except Exception as exc:  # noqa: BLE001 - isolate the poisoned row(s) by retrying one at a time
            if len(index) == 1:
                return {index[0]: exc}
            log.warning("engine failed on a batch of %d rows (%s); retrying row by row", len(index), exc)
            results: dict[int, Any] = {}
            for i in index:
                results.update(self._edit_rows(batch, [i]))
            return results

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        pending = [i for i in range(n) if (batch["status"][i] or PENDING) == PENDING]
        started, samples = time.perf_counter(), self.engine.unet_samples
        with torch.inference_mode():
            outputs = self._edit_rows(batch, pending) if pending else {}
        per_row_seconds = (time.perf_counter() - started) / max(len(pending), 1)
        # UNet samples this call ran (padding and the CFG doubling included), shared out over its rows
        unet_samples = np.zeros(n)
        unet_samples[pending] = (self.engine.unet_samples - samples) / max(len(pending), 1)
        size = self.engine.size
        edited = np.zeros((n, size, size, 3), dtype=np.uint8)
        blobs = np.array([b""] * n, dtype=object)
        inversion_passes, sampling_passes = np.zeros(n, np.int64), np.zeros(n, np.int64)
        source_passes, mask_passes = np.zeros(n, np.int64), np.zeros(n, np.int64)
        control = np.array(["none"] * n, dtype=object)
        masks, has_mask = np.zeros((n, size, size), dtype=np.uint8), np.zeros(n, bool)  # the region each edit changed
        cache_hit = np.zeros(n, bool)
        reconstructions = np.zeros((n, size, size, 3), dtype=np.uint8) if self.measure_fidelity else None
        fidelity = {name: np.full(n, np.nan) for name in ("psnr", "ssim", "latent_mse")}
        status, code, error = batch["status"].copy(), batch["error_code"].copy(), batch["error"].copy()
        for i, out in outputs.items():
            if isinstance(out, Exception):
                status[i], code[i], error[i] = FAILED, "engine_error", f"{type(out).__name__}: {out}"
                continue
            edited[i] = out.image
            inversion_passes[i], sampling_passes[i], cache_hit[i] = (out.inversion_passes, out.sampling_passes,
                                                                     out.cache_hit)
            source_passes[i], mask_passes[i], control[i] = out.source_passes, out.mask_passes, out.attention_control
            if out.mask is not None:
                masks[i], has_mask[i] = out.mask, True
            if out.reconstruction is not None:
                reconstructions[i] = out.reconstruction
                for name in fidelity:
                    fidelity[name][i] = getattr(out, name)
            if not parse_method(str(batch["inversion"][i])).caches:
                continue
            if self.cache_latents and (out.inversion_passes > 0 or out.trajectory.extras and not out.cache_hit):
                blobs[i] = encode_trajectory_blob(out.trajectory)  # new levels: the write stage stores them
            self._remember(batch["cache_uri"][i], out.trajectory)
        result = {k: v for k, v in batch.items() if k != "cache_blob"}  # pixels go on: the write stage saves inputs
        if reconstructions is not None:
            result.update(reconstruction=reconstructions, **fidelity)
        result.update(edited=edited, trajectory_blob=blobs, inversion_passes=inversion_passes,
                      sampling_passes=sampling_passes, source_passes=source_passes, mask_passes=mask_passes,
                      attention_control=control, mask_pixels=masks, has_mask=has_mask, cache_hit=cache_hit,
                      status=status, error_code=code, error=error, engine_seconds=np.full(n, per_row_seconds),
                      engine_dtype=np.full(n, self.dtype, dtype=object), unet_samples=unet_samples)
        failpoint("engine_batch_done")
        return result

    def _remember(self, key: Any, trajectory: Any) -> None:
        if not key:
            return
        self._recent[str(key)] = trajectory
        self._recent.move_to_end(str(key))
        while len(self._recent) > TRAJECTORIES_KEPT:
            self._recent.popitem(last=False)
