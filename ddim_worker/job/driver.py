"""The job's driver: check, start the stream, count what comes back, and write the records at the end.

Every manifest row ends as one result row in the ``results/`` shards: ``ok``, ``failed`` (with an ``error_code``)
or ``skipped`` (not run: the job stopped early). Rows an earlier run finished keep their result and are not redone.
A lost node or dead actor aborts Ray Data's dataset; the driver then re-runs only what is still to do. The driver's
memory does not grow with the manifest beyond a few bytes a row (id hashes and two bits; see ``source``).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddim_worker import storage
from ddim_worker.job import engine_pool, records, shards
from ddim_worker.job.config import JobConfig
from ddim_worker.job.source import SourceContext, find_duplicates, plan_source
from ddim_worker.manifest import ManifestError, parse_column_map
from ddim_worker.models import ModelLoadError, check_model, model_fingerprint
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, OK, SKIPPED
from ddim_worker.stages import StageContext

log = logging.getLogger("ddim_edit.job")

#: Result rows the report reads (a sample, at scale): its pages and contact sheet stay bounded.
REPORT_ROWS = 1000

#: Seconds a stopped job waits for tasks already past the stop marker to finish their shard.
STOP_GRACE_S = 2.0

#: Computed rows before --max-failed-fraction is judged (a first failed row alone must not stop a job).
MIN_ROWS_FOR_FAILED_FRACTION = 10


class JobError(RuntimeError):
    """The job as a whole cannot run (bad manifest, model or output): one clear message, no traceback per row."""


class Progress:
    """Rows done / failed / total, rows/s and ETA, logged at most every few seconds."""

    def __init__(self, total: int, already: int, every_s: float = 5.0):
        self.total, self.done, self.failed, self.every_s = total, already, 0, every_s
        self.started = self.last = time.monotonic()
        self.computed = 0

    def update(self, statuses: list[str], force: bool = False) -> None:  # noqa: D102
        self.done += len(statuses)
        self.computed += len(statuses)
        self.failed += sum(s == FAILED for s in statuses)
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.computed / max(now - self.started, 1e-9)
            left = self.total - self.done
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            log.info("rows %d/%d done (%d failed), %.2f rows/s, ETA %s", self.done, self.total, self.failed, rate,
                     eta)


def check_model_or_fail(config: JobConfig) -> tuple[str, str | None]:
    """(model as the actors load it, resolved Hub commit): local folders made absolute (actors may run elsewhere),
    Hub ids resolved, and the scheduler checked, all before Ray starts."""
    try:
        commit = check_model(config.model, config.storage_options, revision=config.revision)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from None
    local = Path(config.model).expanduser()
    return (str(local.resolve()) if local.is_dir() else config.model), commit


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]


def _is_setup_failure(exc: BaseException) -> bool:
    """The engine actors cannot start (model load failed): retrying the dataset would fail the same way."""
    chain, seen = [exc], set()
    while chain[-1] is not None and id(chain[-1]) not in seen:
        seen.add(id(chain[-1]))
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return any("ModelLoadError" in repr(e) or "cannot load model" in str(e) for e in chain if e is not None)


@dataclass
class Tally:
    """What the driver keeps while rows stream past: counters, and one bit per manifest row (done, failed)."""

    total: int
    finished: np.ndarray = field(init=False)  # rows this generation wrote a result for
    failed: np.ndarray = field(init=False)
    counts: Counter = field(default_factory=Counter)
    inversions: int = 0
    cache_hits: int = 0
    unet_passes: int = 0
    unet_samples: float = 0.0
    ideal_unet_samples: int = 0
    recovered: int = 0
    dtypes: set = field(default_factory=set)

    def __post_init__(self) -> None:
        self.finished = np.zeros(self.total, bool)
        self.failed = np.zeros(self.total, bool)

    def new_generation(self) -> None:
        self.finished[:] = False
        self.failed[:] = False

    def add(self, summary: dict[str, np.ndarray]) -> list[str]:
        rows = summary["manifest_row"].astype(np.int64)
        statuses = [str(s) for s in summary["status"]]
        self.finished[rows] = True
        self.failed[rows] = [s == FAILED for s in statuses]
        self.counts.update(statuses)
        passes = summary["inversion_passes"].astype(np.int64)
        self.inversions += int((passes > 0).sum())
        self.cache_hits += int(summary["cache_hit"].astype(bool).sum())
        self.unet_passes += int(summary["unet_passes"].astype(np.int64).sum())
        self.unet_samples += float(summary["unet_samples"].astype(np.float64).sum())
        self.ideal_unet_samples += int(summary["ideal_unet_samples"].astype(np.int64).sum())
        self.recovered += int(summary["recovered"].astype(bool).sum())
        self.dtypes.update(str(d) for d, s in zip(summary["dtype"], statuses) if s == OK and d)
        return statuses


def _stop_marker(layout: OutputLayout, generation: str) -> str:
    return storage.join_uri(layout.root, f".stop-{generation}")


def _run_generations(config: JobConfig, source_ctx: SourceContext, ctx: StageContext, batch_size: int, model: str,
                     progress: Progress, tally: Tally) -> tuple[StageContext, str | None, int]:
    """Run the rows left to do through Ray Data; after an abort (a lost node), again over what is still left."""
    layout = ctx.layout
    stopped_early = None
    for attempt in range(1, config.max_attempts + 1):
        ok_shards = [s for s in shards.list_shards(layout, config.storage_options) if s.kind == shards.OK_KIND]
        done = engine_pool.done_hashes(shards.shard_uris(layout, ok_shards), config.storage_options)
        generation = shards.new_generation(attempt)
        ctx = dataclasses.replace(ctx, generation=generation, stop_marker=_stop_marker(layout, generation))
        run_ctx = dataclasses.replace(source_ctx, done=_put(done))
        tally.new_generation()
        try:
            for summary in engine_pool.build_dataset(config, run_ctx, ctx, batch_size, model).iter_batches(
                    batch_size=None, batch_format="numpy"):
                progress.update(tally.add(summary))
                computed = sum(tally.counts.values())
                if config.max_failed_fraction is not None and computed >= MIN_ROWS_FOR_FAILED_FRACTION:
                    failed = tally.counts[FAILED]
                    if failed / computed > config.max_failed_fraction:
                        stopped_early = (f"stopped early: {failed} of {computed} computed rows failed, over "
                                         f"--max-failed-fraction {config.max_failed_fraction}")
                        storage.write_bytes(_stop_marker(layout, ctx.generation), b"stop", config.storage_options)
                        break
            return ctx, stopped_early, attempt
        except Exception as exc:  # noqa: BLE001 - a lost node or dead actor aborts Ray Data's whole dataset
            if _is_setup_failure(exc):
                raise JobError(f"the engine could not start: {_root_cause(exc)}") from None
            if attempt == config.max_attempts:
                raise JobError(f"dataset failed {attempt} times; rerun the same command to resume: "
                               f"{_root_cause(exc)}") from exc
            log.warning("dataset aborted (%s); re-running the unfinished rows (attempt %d of %d)",
                        _root_cause(exc), attempt + 1, config.max_attempts)
    raise AssertionError("unreachable")


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def _record_not_run(config: JobConfig, source_ctx: SourceContext, ctx: StageContext, tally: Tally,
                    reason: str) -> None:
    """After an early stop, every row with no result yet gets one (``skipped``), so the results stay complete.

    Tasks in flight when the driver stopped may still write a shard; once they have seen the stop marker, the rows
    with a result are every ok row and every row of this generation's shards, read back from the shards themselves.
    """
    time.sleep(STOP_GRACE_S)
    listed = shards.list_shards(ctx.layout, config.storage_options)
    ok = [s for s in listed if s.kind == shards.OK_KIND]
    done = engine_pool.done_hashes(shards.shard_uris(ctx.layout, ok), config.storage_options)
    this_run = [s for s in listed if s.generation == ctx.generation]
    finished = tally.finished | engine_pool.rows_in_shards(shards.shard_uris(ctx.layout, this_run),
                                                           config.storage_options, tally.total)
    not_run = dataclasses.replace(source_ctx, done=_put(done), finished=_put(finished), not_run=reason)
    record_ctx = dataclasses.replace(ctx, stop_marker=None)
    for summary in engine_pool.record_rows(not_run, record_ctx).iter_batches(batch_size=None, batch_format="numpy"):
        tally.add(summary)


def run_job(config: JobConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary that is also written to ``job.json``."""
    started = time.monotonic()
    layout = OutputLayout(config.output, config.latent_cache)
    try:
        storage.check_writable(config.output, config.storage_options)
    except OSError as exc:
        raise JobError(f"cannot write to --output {config.output}: {exc}") from None
    model, hub_commit = check_model_or_fail(config)
    for prefix in {config.output, layout.latents}:
        if removed := storage.remove_stale_temp_files(prefix, config.storage_options):
            log.warning("removed %d partial files a killed earlier run left under %s", removed, prefix)
    try:
        source = plan_source(config.manifest, parse_column_map(config.columns), config.storage_options,
                             config.limit)
    except (ManifestError, OSError) as exc:
        raise JobError(f"cannot read manifest {config.manifest}: {exc}") from None
    fingerprint = model_fingerprint(model, config.storage_options, config.revision, hub_commit)
    if config.overwrite and (removed := shards.remove_all(layout, config.storage_options)):
        log.info("--overwrite: removed %d earlier results shards", removed)

    engine_pool.init_ray(config)
    config.gpus_per_actor = engine_pool.cluster_gpus_per_actor(config)
    device = engine_pool.probe_engine_device(config) if config.device == "cuda" else None
    dtype = device.dtype if device else _cpu_dtype(config)
    batch_size = engine_pool.batch_size_for(config, device)

    source_ctx = SourceContext(source, config.edit, config.max_prompt_chars)
    rows_index, hashes = engine_pool.index_manifest(source_ctx)
    source_ctx = dataclasses.replace(source_ctx, duplicates=find_duplicates(rows_index, hashes))
    del rows_index
    ctx = StageContext(layout=layout, manifest=source.files, model=config.model, model_fingerprint=fingerprint,
                       dtype=dtype, size=config.engine.size, storage_options=config.storage_options,
                       policy=config.policy(), max_pixels=config.max_pixels, min_side=config.min_image_side,
                       resume=not config.overwrite, carried=source.carried_schema,
                       results_schema=shards.results_schema(source.carried_schema, config.embed_images),
                       embed_images=config.embed_images)
    log.info("manifest %s: %d rows in %d row groups, %d files; %d repeated ids", config.manifest,
             source.total_rows, len(source.groups), len(source.files.files), len(source_ctx.duplicates))

    tally = Tally(source.total_rows)
    progress = Progress(source.total_rows, 0)
    ctx, stopped_early, attempts = _run_generations(config, source_ctx, ctx, batch_size, model, progress, tally)
    if stopped_early:
        log.error(stopped_early)
        _record_not_run(config, source_ctx, ctx, tally, "not run: " + stopped_early)
    progress.update([], force=True)
    superseded = shards.remove_superseded(layout, ctx.generation, config.storage_options)
    storage.remove(_stop_marker(layout, ctx.generation), config.storage_options)
    failed_uri = records.write_failed_manifest(config, source_ctx, tally.failed)
    report = {"pages": [None], "contact_sheet": None}
    if config.report:
        from ddim_worker.report import write_report

        sample = shards.sample_rows(layout, config.storage_options, REPORT_ROWS)
        report = write_report(config.output, sample, config.storage_options)
    ok_shards = [s for s in shards.list_shards(layout, config.storage_options) if s.kind == shards.OK_KIND]
    ids = np.unique(hashes[hashes != 0])  # a repeated id is one result (its first row), not two
    done_before = int(np.isin(ids, engine_pool.done_hashes(
        shards.shard_uris(layout, ok_shards), config.storage_options)).sum()) - tally.counts[OK]
    wall = time.monotonic() - started
    computed = sum(tally.counts.values()) - tally.counts[SKIPPED] - tally.recovered
    summary = {
        "counts": {OK: tally.counts[OK] + max(done_before, 0), FAILED: tally.counts[FAILED],
                   SKIPPED: tally.counts[SKIPPED]},
        "total": source.total_rows,
        "done_before": max(done_before, 0),  # ok in an earlier run: skipped, their results kept
        "computed": computed,
        "recovered": tally.recovered,  # PNG written by a killed run before its results shard: recorded, not redone
        "inversions": tally.inversions,
        "cache_hits": tally.cache_hits,
        "unet_passes": tally.unet_passes,
        # UNet samples run (padding and CFG doubling included) next to what the work needs: unique inversions x
        # (n - s) x (2 when guided) + rows x (n - s) x (2 when guided), cache hits excluded
        "unet_samples": round(tally.unet_samples),
        "ideal_unet_samples": tally.ideal_unet_samples,
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(computed / wall, 4) if wall > 0 else None,
        "stopped_early": stopped_early,
        "attempts": attempts,  # > 1: Ray aborted the dataset (lost node) and the driver re-ran unfinished rows
        "generation": ctx.generation,
        "superseded_shards": superseded,
        "batch_size": batch_size,
        "gpus_per_actor": config.gpus_per_actor,
        "config": {k: v for k, v in config.flat().items() if k != "storage_options"},  # rerun: --config job.json
        "model": config.model,
        "model_revision": hub_commit,
        "model_fingerprint": fingerprint,
        "dtype": sorted(tally.dtypes)[0] if len(tally.dtypes) == 1 else (sorted(tally.dtypes) or dtype),
        "versions": records.versions(),
        "outputs": {"images": layout.folder("edited"), "results": layout.results_folder, "latents": layout.latents,
                    "failed_manifest": failed_uri, "report": report["pages"][0] if report["pages"] else None,
                    "contact_sheet": report["contact_sheet"], "job": layout.job_record},
    }
    records.write_job_record(config, summary)
    return summary


def _cpu_dtype(config: JobConfig) -> str:
    import torch

    from ddim_worker.models import choose_dtype

    return str(choose_dtype(config.engine.dtype, torch.device("cpu"))).removeprefix("torch.")


def main(argv: list[str] | None = None) -> int:
    """``ddim-edit run``: exit 0 when every row is accounted for, 2 when the job cannot run, 3 when stopped early."""
    from ddim_worker.job.args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        summary = run_job(config)
    except JobError as exc:
        print(f"ddim-edit: error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(f"ddim-edit: {summary['total']} rows: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} skipped; {summary['computed']} computed in {summary['wall_seconds']:.1f}s "
          f"({summary['rows_per_second'] or 0:.2f} rows/s), {summary['inversions']} inversions")
    for name, uri in summary["outputs"].items():
        if uri:
            print(f"  {name:16s} {uri}")
    if summary["stopped_early"]:
        print(f"ddim-edit: {summary['stopped_early']}", file=sys.stderr)
        return 3
    return 0
