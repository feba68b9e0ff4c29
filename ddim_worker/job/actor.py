"""The Ray Data callable class: loads the engine once, edits batches. Thin on purpose: no maths, no storage.

Used as ``ds.map_batches(EditActor, compute=ActorPoolStrategy(size=N), num_gpus=G, fn_constructor_kwargs=...)``;
resources are set there, at the call site. Rows that failed upstream pass through untouched; a batch that fails in
the engine is retried row by row, so one poisoned row fails alone (``engine_error``).
"""

from __future__ import annotations

import logging
import pickle
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import numpy as np

from ddim_worker.columns import RowSchema, current, output_columns, setting_values
from ddim_worker.failpoints import failpoint
from ddim_worker.fetch import ensure_worker_logging
from ddim_worker.model_source import local_model_path
from ddim_worker.core.candidates import Thresholds
from ddim_worker.rows import FAILED, PENDING, RowError
from ddim_worker.job.task_packing import drop_fillers
from ddim_worker.core.settings import SETTING_NAMES, EngineSettings

if TYPE_CHECKING:
    from ddim_worker.core.engine import EditRow

log = logging.getLogger(__name__)

#: Trajectories an actor keeps in memory, by latent-cache key: the next batches of rows of the same image (sorted
#: next to each other by the manifest stage) reuse them before the cache write of the first is even visible.
TRAJECTORIES_KEPT = 64


class EditActor:
    """One engine per actor process. torch and the engine are imported here, in the actor, not where the class is
    named: the driver hands Ray this class and must not pay for torch (about a second and 300 MB) to do so."""

    def __init__(self, model: str, engine: EngineSettings, batch_size: int, device: str = "auto",
                 storage_options: dict | None = None, num_threads: int | None = None,
                 measure_fidelity: bool = False, revision: str | None = None, variant: str | None = None,
                 cache_latents: bool = True, schema: RowSchema | None = None, scorer: str | None = None,
                 thresholds: Thresholds | None = None, keep_candidates: bool = False):
        ensure_worker_logging()
        # The model's local copy first, before torch: a node that cannot hold it (a broken disk, no room) fails its
        # actor in a second instead of after the heavy imports, and Ray Data restarts it on the same node again and
        # again while the job runs elsewhere.
        model_path = local_model_path(model, storage_options)
        import torch

        from ddim_worker.core.engine import EditEngine
        from ddim_worker.core.fastpath import apply_fast_path

        if num_threads:
            torch.set_num_threads(num_threads)  # the cores Ray gave this actor, not every core of the node
        # A fixed engine batch size makes every row's output independent of its neighbours (see EditEngine).
        self.engine = EditEngine.from_pretrained(model_path, device=device,
                                                 dtype=engine.dtype, size=engine.size, batch_size=batch_size,
                                                 revision=revision, variant=variant)
        # The same switches the benchmark measures; with a fixed batch size a compiled UNet sees one shape.
        apply_fast_path(self.engine.pipe, attention=engine.attention, channels_last=engine.channels_last,
                        compile_unet=engine.compile_unet)
        self.measure_fidelity = measure_fidelity
        self.cache_latents = cache_latents  # --latent-cache off: no trajectory is encoded for the write stage
        self.dtype = str(self.engine.dtype).removeprefix("torch.")  # what this actor really runs, reported per row
        self._recent: OrderedDict[str, Any] = OrderedDict()
        self.schema = schema or current()  # the driver's: the engine columns it planned the results with
        self.thresholds = thresholds or Thresholds()
        self.keep_candidates = keep_candidates  # every candidate goes on to the write stage, not only the chosen
        self.scorer = None
        if scorer:  # on the engine's device, loaded once like the engine
            from ddim_worker.core.scorer import ClipScorer

            self.scorer = ClipScorer(local_model_path(scorer, storage_options, marker="config.json"),
                                     device=self.engine.device)

    def _row(self, batch: dict[str, np.ndarray], i: int) -> EditRow:
        """Row ``i`` of a batch as an engine request: its image, prompts and every setting (``columns``)."""
        from ddim_worker.core.engine import EditRow

        blob = batch["cache_blob"][i]
        return EditRow(image=batch["pixels"][i], source_prompt=str(batch["source_prompt"][i]),
                       edit_prompt=str(batch["edit_prompt"][i]),
                       cached=self._cached(blob) or self._recent.get(str(batch["cache_uri"][i] or "")),
                       **setting_values({name: batch[name][i] for name in SETTING_NAMES}))

    @staticmethod
    def _cached(blob: Any) -> Any:
        from ddim_worker.core.trajectory_codec import decode_trajectory

        if blob is None or not len(blob):
            return None
        try:
            return decode_trajectory(bytes(blob))
        except Exception as exc:  # noqa: BLE001 - a corrupt cache entry is a miss; the write stage replaces it
            log.warning("ignoring unreadable latent-cache entry: %s", exc)
            return None

    def _edit_rows(self, batch: dict[str, np.ndarray], index: list[int]) -> dict[int, tuple[EditRow, Any]]:
        """(request, output) by row, the output being the exception for rows that fail even alone. A row's
        candidates are edited in one engine call list (one inversion, one source branch) and scored together."""
        from ddim_worker.core.candidate_edits import combine, expand

        try:
            rows = {i: self._row(batch, i) for i in index}
            refused = {i: self._refusal(rows[i]) for i in index}
            todo = [i for i in index if refused[i] is None]
            requests = {i: expand(rows[i], str(batch["id"][i])) for i in todo}
            outputs = iter(self.engine.edit([r for i in todo for r in requests[i]],
                                            measure_fidelity=self.measure_fidelity))
            edited = {i: [next(outputs) for _ in requests[i]] for i in todo}
            scores = self._scores(batch, requests, edited)
            done = {i: (rows[i], scores[i] if isinstance(scores.get(i), Exception)
                        else combine(requests[i], edited[i], scores.get(i), self.thresholds,
                                     keep=self.keep_candidates)) for i in todo}
            return {**{i: (rows[i], refused[i]) for i in index if refused[i] is not None}, **done}
        except Exception as exc:  # noqa: BLE001 - isolate the poisoned row(s) by retrying one at a time
            if len(index) == 1:
                return {index[0]: (None, exc)}
            log.warning("engine failed on a batch of %d rows (%s); retrying row by row", len(index), exc)
            results: dict[int, tuple[EditRow, Any]] = {}
            for i in index:
                results.update(self._edit_rows(batch, [i]))
            return results

    def _refusal(self, row: EditRow) -> RowError | None:
        if int(row.candidates) > 1 and self.scorer is None:
            return RowError("bad_setting", f"candidates is {row.candidates}: choosing among candidates needs a "
                                           "scorer (--scorer MODEL)")
        return None

    def _scores(self, batch: dict[str, np.ndarray], requests: dict[int, list[EditRow]],
                edited: dict[int, list[Any]]) -> dict[int, Any]:
        """Each row's candidates' scores (one scorer call for the batch; row by row if it fails, and then a row that
        still fails gets its exception). Empty without a scorer."""
        if self.scorer is None or not edited:
            return {}
        try:
            return self._score_rows(batch, requests, edited, list(edited))
        except Exception as exc:  # noqa: BLE001 - find the row the scorer cannot score
            log.warning("scorer failed on a batch (%s); scoring row by row", exc)
        out: dict[int, Any] = {}
        for i in edited:
            try:
                out.update(self._score_rows(batch, requests, edited, [i]))
            except Exception as exc:  # noqa: BLE001 - that row's error, never the job's
                out[i] = RowError("score_failed", f"the scorer could not score this row: {type(exc).__name__}: "
                                                  f"{exc}")
        return out

    def _score_rows(self, batch: dict[str, np.ndarray], requests: dict[int, list[EditRow]],
                    edited: dict[int, list[Any]], index: list[int]) -> dict[int, Any]:
        pairs = [(i, row, out) for i in index for row, out in zip(requests[i], edited[i])]
        scores = iter(self.scorer.score([batch["pixels"][i] for i, _, _ in pairs], [out.image for _, _, out in pairs],
                                        [row.source_prompt for _, row, _ in pairs],
                                        [row.edit_prompt for _, row, _ in pairs]))
        return {i: [next(scores) for _ in requests[i]] for i in index}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """batch -> engine requests -> outputs -> the engine's columns (declared in ``columns``) on the batch."""
        import torch

        batch = self.schema.restore_nulls(drop_fillers(batch))
        n = len(batch["id"])
        pending = [i for i in range(n) if (batch["status"][i] or PENDING) == PENDING]
        started, samples = time.perf_counter(), self.engine.unet_samples
        with torch.inference_mode():
            edited = self._edit_rows(batch, pending) if pending else {}
        per_row_seconds = (time.perf_counter() - started) / max(len(pending), 1)
        # UNet samples this call ran (padding and the CFG doubling included), shared out over its rows
        unet_samples = np.zeros(n)
        unet_samples[pending] = (self.engine.unet_samples - samples) / max(len(pending), 1)
        result = self._columns(batch, edited)
        result.update(engine_seconds=np.full(n, per_row_seconds), unet_samples=unet_samples)
        failpoint("engine_batch_done")
        return result

    def _columns(self, batch: dict[str, np.ndarray], edited: dict[int, tuple[EditRow, Any]]) -> dict[str, np.ndarray]:
        """The batch (less its cache blobs) with the engine's columns: failures, declared outputs, payloads."""
        n = len(batch["id"])
        status, code, error = batch["status"].copy(), batch["error_code"].copy(), batch["error"].copy()
        for i, (_, out) in edited.items():
            if isinstance(out, RowError):
                status[i], code[i], error[i] = FAILED, out.code, out.message
            elif isinstance(out, Exception):
                status[i], code[i], error[i] = FAILED, "engine_error", f"{type(out).__name__}: {out}"
        done = {i: pair for i, pair in edited.items() if not isinstance(pair[1], Exception)}
        result = {k: v for k, v in batch.items() if k != "cache_blob"}  # pixels go on: the write stage saves inputs
        result.update(output_columns(self.schema, n, {i: row for i, (row, _) in done.items()},
                                     {i: out for i, (_, out) in done.items()}))
        result.update(self._payloads(n, {i: out for i, (_, out) in done.items()}))
        result["candidate_images"] = np.array([b""] * n, dtype=object)
        for i, (_, out) in done.items():
            if out.kept_candidates:
                result["candidate_images"][i] = pickle.dumps(out.kept_candidates, protocol=pickle.HIGHEST_PROTOCOL)
        result.update(trajectory_blob=self._trajectories(batch, n, done), status=status, error_code=code,
                      error=error, engine_dtype=np.full(n, self.dtype, dtype=object))
        return result

    def _payloads(self, n: int, outputs: dict[int, Any]) -> dict[str, np.ndarray]:
        """The pictures each edit hands the write stage: the edited image, its mask, its reconstruction (fidelity)."""
        size = self.engine.size
        shapes = {"edited": (size, size, 3), "mask_pixels": (size, size)}
        if self.measure_fidelity:
            shapes["reconstruction"] = (size, size, 3)
        arrays = {name: np.zeros((n, *shape), np.uint8) for name, shape in shapes.items()}
        for name, array in arrays.items():
            attribute = self.schema[name].output
            for i, out in outputs.items():
                if getattr(out, attribute) is not None:
                    array[i] = getattr(out, attribute)
        return arrays

    def _trajectories(self, batch: dict[str, np.ndarray], n: int, done: dict[int, tuple[EditRow, Any]]) -> np.ndarray:
        """New trajectory levels for the write stage to cache (encoded), each also kept in this actor's memory."""
        from ddim_worker.core.inversion import parse_method
        from ddim_worker.core.trajectory_codec import encode_trajectory_blob

        blobs = np.array([b""] * n, dtype=object)
        for i, (_, out) in done.items():
            if not parse_method(str(batch["inversion"][i])).caches:
                continue
            if self.cache_latents and (out.inversion_passes > 0 or out.trajectory.extras and not out.cache_hit):
                blobs[i] = encode_trajectory_blob(out.trajectory)  # new levels: the write stage stores them
            self._remember(batch["cache_uri"][i], out.trajectory)
        return blobs

    def _remember(self, key: Any, trajectory: Any) -> None:
        if not key:
            return
        self._recent[str(key)] = trajectory
        self._recent.move_to_end(str(key))
        while len(self._recent) > TRAJECTORIES_KEPT:
            self._recent.popitem(last=False)
