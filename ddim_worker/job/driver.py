"""The job's driver: check, take the output's lease, start the stream, count what comes back, record the end.

Every manifest row ends as one result row in the ``results/`` ledger: ``ok``, ``failed`` (with an ``error_code``)
or ``skipped`` (not run: the job stopped early). Rows an earlier run finished from the same inputs keep their result
and are not redone. A lost node or dead actor aborts Ray Data's dataset; the driver then re-runs only what is still
to do. The counts the driver reports are read back from the ledger (``ledger``), so they are the table's. The
driver's memory does not grow with the manifest beyond a few bytes a row (id hashes, a state per row; see
``source`` and ``ledger``).
"""

from __future__ import annotations

import _thread
import dataclasses
import itertools
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ddim_worker import storage
from ddim_worker.errors import root_cause
from ddim_worker.failpoints import failpoint
from ddim_worker.job import cluster, ledger, manifest_passes, pipeline, records, shards
from ddim_worker.job.compat import IncompatibleOutput, check_compatible, record_identity
from ddim_worker.job.pack import PackError, PackResult, card_facts, pack
from ddim_worker.job.sizes import parse_size
from ddim_worker.job.config import JobConfig
from ddim_worker.job.lease import Lease, LeaseHeld, check_free
from ddim_worker.job.source import SourceContext, find_duplicates, plan_source
from ddim_worker.manifest import ManifestError, ledger_key, parse_column_map
from ddim_worker.models import ModelLoadError, check_model, model_fingerprint
from ddim_worker.outputs import STOP_MARKER_PREFIX, OutputLayout
from ddim_worker.rows import FAILED, OK, SKIPPED
from ddim_worker.stages import StageContext

log = logging.getLogger("ddim_edit.job")

#: Result rows the report shows (a sample by id hash, at scale): its pages stay bounded.
REPORT_ROWS = 1000

#: Rows whose input (and, with --no-save-images, edited) images are kept for the report's pictures: the contact
#: sheet shows 64 of them. Every other input is written only with --save-inputs.
REPORT_IMAGES = 100

#: Longest wait, after a stop, for results shards that tasks past the stop marker are still writing (a token each).
STOP_WAIT_S = 60.0

#: Temp files in a shared latent cache older than this are a killed writer's, never a write in flight.
STALE_TEMP_AGE_S = 3600.0

#: Computed rows before --max-failed-fraction is judged (a first failed row alone must not stop a job).
MIN_ROWS_FOR_FAILED_FRACTION = 10


class JobError(RuntimeError):
    """The job as a whole cannot run (bad manifest, model or output): one clear message, no traceback per row."""


class LeaseLost(JobError):
    """Another run took the output: this run writes nothing more, its records included."""


class Progress:
    """Rows done / failed / total, rows/s and ETA, logged at most every few seconds; counts from what is done."""

    def __init__(self, total: int, already: int, every_s: float = 5.0):
        self.total, self.done, self.failed, self.every_s = total, already, 0, every_s
        self.started = self.last = time.monotonic()
        self.computed = 0

    def update(self, statuses: list[str], force: bool = False) -> None:  # noqa: D102
        self.done = min(self.done + len(statuses), self.total)
        self.computed += len(statuses)
        self.failed += sum(s == FAILED for s in statuses)
        now = time.monotonic()
        if force or now - self.last >= self.every_s:
            self.last = now
            rate = self.computed / max(now - self.started, 1e-9)
            left = self.total - self.done
            eta = f"{left / rate:.0f}s" if rate > 0 else "?"
            log.info("rows %d/%d done (%d failed this run), %.2f rows/s, ETA %s", self.done, self.total,
                     self.failed, rate, eta)


def check_model_or_fail(config: JobConfig) -> tuple[str, str | None]:
    """(model as the actors load it, resolved Hub commit): local folders made absolute (actors may run elsewhere),
    Hub ids resolved, and the scheduler checked, all before Ray starts."""
    try:
        commit = check_model(config.model, config.storage_options, revision=config.revision)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from None
    local = Path(config.model).expanduser()
    return (str(local.resolve()) if local.is_dir() else config.model), commit



def _is_setup_failure(exc: BaseException) -> bool:
    """The engine actors cannot start (model load failed)."""
    chain, seen = [exc], set()
    while chain[-1] is not None and id(chain[-1]) not in seen:
        seen.add(id(chain[-1]))
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return any("ModelLoadError" in repr(e) or "cannot load model" in str(e) for e in chain if e is not None)


@dataclass
class Tally:
    """What the driver keeps while rows stream past: work counters, and a byte per manifest row (computed)."""

    total: int
    computed: np.ndarray = field(init=False)  # rows this run edited (or failed), counted once across attempts
    rows_seen: int = 0  # results that came back this attempt (progress of an attempt that then aborted)
    failed_seen: int = 0
    inversions: int = 0
    cache_hits: int = 0
    unet_passes: int = 0
    unet_samples: float = 0.0
    ideal_unet_samples: int = 0
    recovered: int = 0
    dtypes: set = field(default_factory=set)
    written: dict = field(default_factory=lambda: dict.fromkeys(("images", "inputs", "latents", "results"), 0))

    def __post_init__(self) -> None:
        self.computed = np.zeros(self.total, bool)

    def bytes_written(self, dataset: int, computed: int) -> dict[str, Any]:
        """Bytes this run wrote, by kind (images: edited PNGs saved or embedded; inputs: inputs and
        reconstructions), and per computed row."""
        kinds = {**self.written, "dataset": dataset}
        return {**kinds, "total": sum(kinds.values()),
                "per_row": {k: round(v / computed) for k, v in kinds.items()} if computed else None}

    def add(self, summary: dict[str, np.ndarray]) -> list[str]:
        rows = summary["manifest_row"].astype(np.int64)
        statuses = [str(s) for s in summary["status"]]
        recovered = summary["recovered"].astype(bool)
        ran = np.array([s in (OK, FAILED) for s in statuses], bool) & ~recovered
        self.computed[rows[ran]] = True
        self.rows_seen += len(statuses)
        self.failed_seen += sum(s == FAILED for s in statuses)
        passes = summary["inversion_passes"].astype(np.int64)
        self.inversions += int((passes > 0).sum())
        self.cache_hits += int(summary["cache_hit"].astype(bool).sum())
        self.unet_passes += int(summary["unet_passes"].astype(np.int64).sum())
        self.unet_samples += float(summary["unet_samples"].astype(np.float64).sum())
        self.ideal_unet_samples += int(summary["ideal_unet_samples"].astype(np.int64).sum())
        self.recovered += int(recovered.sum())
        for kind, column in (("images", "image_bytes"), ("inputs", "input_bytes"), ("latents", "latent_bytes"),
                             ("results", "results_bytes")):
            if column in summary:
                values = summary[column].astype(np.float64)
                self.written[kind] += int(values[~recovered].sum()) if kind == "images" else int(values.sum())
        self.dtypes.update(str(d) for d, s in zip(summary["dtype"], statuses) if s == OK and d)
        return statuses


@dataclass
class Manifest:
    """The manifest as the driver holds it: its rows' ledger keys (8 bytes a row), and what reading tasks need."""

    source_ctx: SourceContext
    keys: np.ndarray  # uint64 per manifest row: the key its result is filed under (see ``manifest.ledger_key``)

    @property
    def total(self) -> int:
        return len(self.keys)

    def unique_keys(self) -> np.ndarray:
        return np.unique(self.keys)


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def index_manifest(source_ctx: SourceContext) -> Manifest:
    """Id hashes of every row (Ray tasks), repeated ids found (their full ids compared), each row's ledger key."""
    rows, hashes = manifest_passes.index_manifest(source_ctx)
    firsts = find_duplicates(rows, hashes)
    first_ids = manifest_passes.ids_of_rows(source_ctx, sorted(set(firsts.values()))) if firsts else {}
    duplicates = {h: (r, first_ids.get(r)) for h, r in firsts.items()}
    keys = hashes.copy()
    repeated = np.isin(hashes, np.fromiter(firsts, np.uint64, len(firsts))) if firsts else np.zeros(len(keys), bool)
    first_rows = np.fromiter(firsts.values(), np.int64, len(firsts)) if firsts else np.zeros(0, np.int64)
    later = repeated & ~np.isin(rows, first_rows)
    for r in np.flatnonzero((keys == 0) | later):  # no usable id, or a repeat: one result per manifest row
        keys[r] = ledger_key(None, None, int(r))
    return Manifest(dataclasses.replace(source_ctx, duplicates=duplicates), keys)


def _wait_for_inflight(layout: OutputLayout, generation: str, storage_options: dict) -> None:
    """After a stop: wait until no task of this generation is still writing a shard (bounded by ``STOP_WAIT_S``)."""
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        writing = [n for n in storage.list_names(layout.inflight_folder, storage_options)
                   if n.startswith(generation + "-")]
        if not writing:
            return
        time.sleep(0.2)
    log.warning("results shards still being written %.0f s after the stop; going on", STOP_WAIT_S)


@dataclass
class Run:
    """One run of the job: its number (the ledger's order), its lease, and what it has learnt so far."""

    config: JobConfig
    layout: OutputLayout
    lease: Lease
    number: int = 0
    generation: str = ""
    attempts: int = 0
    stopped_early: str | None = None
    recorded: bool = False  # job.json holds this run's final record

    def check_lease(self) -> None:
        """Called before every write that changes what other runs see (compaction, pruning, packing, records):
        a run that lost its lease (taken by another run, or not renewed for ``lease.FENCE_S``) writes nothing more.
        Its tasks stop too: each checks the lease before it writes a results shard."""
        reason = self.lease.lost_reason()
        if reason is not None:
            raise LeaseLost(f"this run stopped writing to {self.config.output}: {reason}")


def _run_attempts(run: Run, manifest: Manifest, ctx: StageContext, plan: cluster.EnginePlan, model: str,
                  progress: Progress, tally: Tally, index: ledger.LedgerIndex) -> StageContext:
    """Run the rows left to do through Ray Data (``index``: the ledger as the run found it); after an abort (a lost
    node, actors that could not start while others did), again over what is still left, as the next attempt."""
    config, layout = run.config, run.layout
    aborts = 0
    for attempt in itertools.count(1):
        run.attempts = attempt
        if attempt > 1:
            index = ledger.scan(layout, config.storage_options)
        run.generation = shards.generation_name(run.number, attempt)
        ctx = dataclasses.replace(ctx, generation=run.generation, stop_marker=layout.stop_marker(run.generation))
        run_ctx = dataclasses.replace(manifest.source_ctx, done=_put(index.done()))
        seen_before = tally.rows_seen
        batches = iter(pipeline.build_dataset(config, run_ctx, ctx, plan, model).iter_batches(
            batch_size=None, batch_format="numpy"))
        try:
            for summary in batches:
                run.check_lease()
                progress.update(tally.add(summary))
                computed = int(tally.computed.sum())
                if config.max_failed_fraction is not None and computed >= MIN_ROWS_FOR_FAILED_FRACTION:
                    if tally.failed_seen / max(tally.rows_seen, 1) > config.max_failed_fraction:
                        run.stopped_early = (f"stopped early: {tally.failed_seen} of {tally.rows_seen} computed rows "
                                             f"failed, over --max-failed-fraction {config.max_failed_fraction}")
                        storage.write_bytes(ctx.stop_marker, b"stop", config.storage_options)
                        break
            return ctx
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - a lost node or dead actor aborts Ray Data's whole dataset
            progressed = tally.rows_seen > seen_before
            if _is_setup_failure(exc):
                if not progressed:  # no engine actor could start: another attempt would fail the same way
                    raise JobError(f"the engine could not start: {root_cause(exc)}") from None
                # some actors work and others cannot start (a bad node): go on with another attempt; it is not
                # counted against --max-attempts, and each such attempt makes progress, so they end
                log.warning("engine actors failed to start while others worked (%s); re-running the unfinished "
                            "rows (attempt %d)", root_cause(exc), attempt + 1)
                continue
            aborts += 1
            if aborts >= config.max_attempts:
                raise JobError(f"dataset failed {aborts} times; rerun the same command to resume: "
                               f"{root_cause(exc)}") from exc
            log.warning("dataset aborted (%s); re-running the unfinished rows (attempt %d, abort %d of %d)",
                        root_cause(exc), attempt + 1, aborts, config.max_attempts)
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # stops the stream's executor: no task starts after this


def _record_not_run(run: Run, manifest: Manifest, ctx: StageContext, reason: str) -> None:
    """After an early stop, every row with no result at all gets one (``skipped``), so the results stay complete.

    Tasks that were past the stop marker finish their shard first (the driver waits for their tokens); rows that
    have a result from an earlier run (failed, say) keep it.
    """
    _wait_for_inflight(run.layout, run.generation, run.config.storage_options)
    index = ledger.scan(run.layout, run.config.storage_options)
    finished = index.states(manifest.keys) > 0
    not_run = dataclasses.replace(manifest.source_ctx, finished=_put(finished), not_run=reason)
    for _ in pipeline.record_rows(not_run, dataclasses.replace(ctx, stop_marker=None)).iter_batches(
            batch_size=None, batch_format="numpy"):
        pass


def take_lease(config: JobConfig, layout: OutputLayout, interrupt: bool = True) -> Lease:
    """The output's lease, taken before anything is written (refused in one line when another run holds it). With
    ``interrupt``, losing it interrupts the main thread wherever it waits (``lease_guard`` turns that into
    ``LeaseLost``)."""
    try:
        check_free(layout.lease, config.storage_options, config.break_lease)
        storage.check_writable(config.output, config.storage_options)
        return Lease.acquire(layout.lease, config.storage_options, config.manifest, config.break_lease,
                             on_lost=_interrupt_main if interrupt else None)
    except LeaseHeld as exc:
        raise JobError(str(exc)) from None
    except OSError as exc:
        raise JobError(f"cannot write to --output {config.output}: {exc}") from None


def _interrupt_main(reason: str) -> None:
    """The lease is lost: the driver stops now, not when the next batch of results arrives."""
    _thread.interrupt_main()


def run_job(config: JobConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary that is also written to ``job.json``."""
    started = time.monotonic()
    layout = OutputLayout(config.output, config.latent_cache)
    lease = take_lease(config, layout)
    try:
        return _run_job(Run(config, layout, lease), started)
    except KeyboardInterrupt:
        if (reason := lease.lost_reason()) is not None:
            raise LeaseLost(f"this run stopped writing to {config.output}: {reason}") from None
        raise
    finally:
        lease.release()


def _prepare(run: Run) -> tuple[str, str | None, Any, str]:
    """Everything that needs no Ray: model, manifest footers, stale files, the run's number. Raises ``JobError``."""
    config, layout = run.config, run.layout
    model, hub_commit = check_model_or_fail(config)
    try:
        source = plan_source(config.manifest, parse_column_map(config.columns), config.storage_options,
                             config.limit)
    except (ManifestError, OSError) as exc:
        raise JobError(f"cannot read manifest {config.manifest}: {exc}") from None
    if config.prune_stale and config.limit is not None:
        raise JobError("--prune-stale needs the whole manifest: with --limit it would delete the rows past the limit")
    fingerprint = model_fingerprint(model, config.storage_options, config.revision, hub_commit)
    try:
        check_compatible(config, layout, fingerprint, results_schema(config, source))
    except IncompatibleOutput as exc:
        raise JobError(str(exc)) from None
    except OSError as exc:
        raise JobError(f"cannot read the results under {config.output}: {exc}") from None
    try:
        run.check_lease()
        # The run's number first, before anything is deleted: it never repeats (see ``take_run_number``).
        run.number = take_run_number(layout, config.storage_options)
        storage.remove(layout.failed_manifest, config.storage_options)  # an earlier run's: never this run's
        # Temp files a killed writer left: of this output, every one older than our lease (we hold it now); of a
        # shared latent cache, only those too old to be another job's write in flight.
        if removed := storage.remove_stale_temp_files(config.output, config.storage_options,
                                                      older_than=run.lease.record.started):
            log.warning("removed %d partial files a killed earlier run left under %s", removed, config.output)
        if layout.latents != storage.join_uri(config.output, "latents"):
            storage.remove_stale_temp_files(layout.latents, config.storage_options,
                                            older_than=time.time() - STALE_TEMP_AGE_S)
        if config.overwrite and (removed := shards.remove_all(layout, config.storage_options)):
            log.info("--overwrite: removed %d earlier results shards", removed)
        records.mark_started(config, run.lease.record.run_id, run.number)
        record_identity(config, layout, fingerprint)
    except OSError as exc:
        raise JobError(f"cannot write to --output {config.output}: {exc}") from None
    return model, hub_commit, source, fingerprint


def _stop_marker_runs(layout: OutputLayout, storage_options: dict | None) -> list[int]:
    """Run numbers of the stop markers under the output (a killed run leaves its marker behind)."""
    names = [n for n in storage.list_names(layout.root, storage_options) if n.startswith(STOP_MARKER_PREFIX)]
    return [order[1] for n in names if (order := shards.generation_order(n[len(STOP_MARKER_PREFIX):]))[0] == 1]


def take_run_number(layout: OutputLayout, storage_options: dict | None) -> int:
    """This run's number: one more than any run the output has seen (the counter ``run.json``, the ledger's shards,
    stop markers), recorded in ``run.json`` before anything is deleted. So a number never comes back, whatever
    ``--overwrite`` or a user emptying ``results/`` removed, and no marker or shard of an earlier run can be taken
    for this run's. Stop markers of earlier runs are removed (no run of theirs is in flight: we hold the lease)."""
    try:
        counted = int(json.loads(storage.read_bytes(layout.run_counter, storage_options))["run"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        counted = 0
    markers = _stop_marker_runs(layout, storage_options)
    number = max(counted, shards.next_run(shards.list_shards(layout, storage_options)) - 1, *markers, 0) + 1
    storage.write_bytes(layout.run_counter, json.dumps({"run": number}).encode(), storage_options)
    for name in storage.list_names(layout.root, storage_options):
        if name.startswith(STOP_MARKER_PREFIX):
            storage.remove(storage.join_uri(layout.root, name), storage_options)
    return number


def _run_job(run: Run, started: float) -> dict[str, Any]:
    """Everything after the lease. Whatever ends the run, ``job.json`` says so: the counts (``_finish``) or, for a
    run that failed before it could count, the error (an earlier run's record never reads as this run's)."""
    try:
        model, hub_commit, source, fingerprint = _prepare(run)
        return _run_started(run, started, model, hub_commit, source, fingerprint)
    except LeaseLost:
        raise  # the output is another run's now: write nothing more
    except Exception as exc:
        if not run.recorded:
            try:
                records.mark_failed(run.config, run.lease.record.run_id, run.number,
                                    str(exc) if isinstance(exc, JobError) else root_cause(exc))
            except OSError:
                pass  # the original error is the one to report
        raise


def results_schema(config: JobConfig, source: Any) -> Any:
    """The results' schema for this job: with ``--no-save-images`` the PNGs travel in the results (embedded)."""
    return shards.results_schema(source.carried_schema, embeds_images(config))


def embeds_images(config: JobConfig) -> bool:
    return config.embed_images or not config.save_images


def _run_started(run: Run, started: float, model: str, hub_commit: str | None, source: Any,
                 fingerprint: str) -> dict[str, Any]:
    config, layout = run.config, run.layout
    cluster.init_ray(config)
    plan = cluster.plan_engine(config)

    manifest = index_manifest(SourceContext(source, config.edit, config.max_prompt_chars))
    ctx = StageContext(layout=layout, manifest=source.files, model=config.model, model_fingerprint=fingerprint,
                       dtype=plan.dtype, size=config.engine.size, storage_options=config.storage_options,
                       policy=config.policy(), max_pixels=config.max_pixels, min_side=config.min_image_side,
                       resume=not config.overwrite, carried=source.carried_schema,
                       results_schema=results_schema(config, source), embed_images=embeds_images(config),
                       save_images=config.save_images, save_inputs=config.save_inputs,
                       image_sample=sample_fraction(REPORT_IMAGES, manifest.total) if config.report else 0.0,
                       run_id=run.lease.record.run_id)
    log.info("manifest %s: %d rows in %d row groups, %d files; %d repeated ids", config.manifest,
             source.total_rows, len(source.groups), len(source.files.files), len(manifest.source_ctx.duplicates))

    # The ledger as it stands: rewrite what a killed run left repeated, count what is done already.
    before = ledger.scan(layout, config.storage_options)
    run.check_lease()
    if compacted := ledger.compact(layout, before, config.storage_options):
        log.info("results: %d repeated rows from earlier runs compacted away", compacted)
        before = ledger.scan(layout, config.storage_options)
    unique = manifest.unique_keys()
    done_before = before.counts(unique)[OK]
    tally = Tally(source.total_rows)
    progress = Progress(source.total_rows, done_before)
    error: str | None = None
    try:
        ctx = _run_attempts(run, manifest, ctx, plan, model, progress, tally, before)
        if run.stopped_early:
            log.error(run.stopped_early)
            _record_not_run(run, manifest, ctx, "not run: " + run.stopped_early)
    except LeaseLost:
        raise
    except JobError as exc:
        error = str(exc)
    progress.update([], force=True)
    summary = _finish(run, manifest, ctx, tally, started, error, plan, dict(
        model=model, hub_commit=hub_commit, fingerprint=fingerprint, done_before=done_before))
    if error is not None:
        raise JobError(error)
    return summary


def _finish(run: Run, manifest: Manifest, ctx: StageContext, tally: Tally, started: float, error: str | None,
            plan: cluster.EnginePlan, facts: dict[str, Any]) -> dict[str, Any]:
    """Compact the ledger, read the counts back from it, write failed.parquet, the report, the packed dataset and
    job.json. Every failure to write them is one ``JobError``."""
    config, layout = run.config, run.layout
    try:
        run.check_lease()
        storage.remove(layout.stop_marker(run.generation), config.storage_options)
        index = ledger.scan(layout, config.storage_options)
        unique = manifest.unique_keys()
        outside = index.outside(unique)
        run.check_lease()
        pruned = ledger.compact(layout, index, config.storage_options, drop=outside if config.prune_stale else None)
        if pruned:
            index = ledger.scan(layout, config.storage_options)
            outside = index.outside(unique)
        counts = index.counts(unique)
        states = index.states(manifest.keys)
        # the rows to rerun: failed ones, and any the run never reached (a job that ended in an error)
        run.check_lease()
        failed_uri = records.write_failed_manifest(config, manifest.source_ctx,
                                                   (states == ledger.STATUS_RANK[FAILED]) | (states == 0))
        report = {"pages": [None], "contact_sheet": None}
        if config.report and error is None:
            from ddim_worker.report import write_report

            sample = ledger.sample_rows(layout, index, config.storage_options,
                                        sample_fraction(REPORT_ROWS, manifest.total), unique)
            run.check_lease()
            report = write_report(config.output, sample, config.storage_options)
        dataset, not_packed = None, _why_not_packed(config, error, run.stopped_early)
        if not_packed:
            log.info("dataset: not packed (%s)", not_packed)
        else:
            dataset = pack_dataset(run, index, unique, card_facts(
                config, model_revision=facts["hub_commit"], fingerprint=facts["fingerprint"], dtype=plan.dtype,
                failed=counts[FAILED], skipped=counts[SKIPPED], command=records.command_line(config),
                version=records.versions().get("ddim-edit", "")))
    except OSError as exc:
        raise JobError(f"cannot write the job's records under {config.output}: {type(exc).__name__}: {exc}") \
            from None
    except PackError as exc:
        raise JobError(f"cannot pack the edited dataset under {layout.dataset_folder}: {exc}") from None
    wall = time.monotonic() - started
    computed = int(tally.computed.sum())
    stale = int(outside.sum())
    if stale:
        log.warning("results hold %d rows of ids this run's manifest does not have (kept; --prune-stale deletes "
                    "them)", stale)
    summary = {
        "state": "failed" if error else ("stopped" if run.stopped_early else
                                         ("incomplete" if counts["missing"] else "finished")),
        "error": error,
        "counts": {OK: counts[OK], FAILED: counts[FAILED], SKIPPED: counts[SKIPPED]},  # the table's, over the manifest
        # manifest rows with no result row (a job that failed before reaching them): a run with any exits non-zero
        "missing": counts["missing"],
        "total": manifest.total,
        "done_before": facts["done_before"],  # ok in an earlier run: skipped, their results kept
        "computed": computed,  # rows this run edited or failed (once each, whatever the attempts)
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
        "stopped_early": run.stopped_early,
        "attempts": run.attempts,  # > 1: Ray aborted the dataset (lost node) and the driver re-ran unfinished rows
        "run": run.number,
        "run_id": run.lease.record.run_id,
        "generation": run.generation,
        "results_rows_outside_manifest": stale,  # rows of ids the manifest no longer has (--prune-stale)
        "results_rows_pruned": pruned,
        # decided from the cluster this run found (never in ``config``: a rerun decides again)
        "actors": plan.actors,
        "max_actors": plan.max_actors,  # None: the pool grows with the cluster
        "gpus_per_actor": plan.gpus_per_actor,
        "batch_size": plan.batch_size,
        "bytes_written": tally.bytes_written(dataset.bytes if dataset and not dataset.skipped else 0, computed),
        "dataset": dataset.as_dict() if dataset else None,
        "dataset_not_packed": not_packed,
        "command": records.command_line(config),
        "config": records.recorded_config(config),  # rerun: --config job.json
        "model": config.model,
        "model_revision": facts["hub_commit"],
        "model_fingerprint": facts["fingerprint"],
        "dtype": sorted(tally.dtypes)[0] if len(tally.dtypes) == 1 else (sorted(tally.dtypes) or plan.dtype),
        "versions": records.versions(),
        "outputs": {"images": layout.folder("edited"), "results": layout.results_folder, "latents": layout.latents,
                    "failed_manifest": failed_uri, "report": report["pages"][0] if report["pages"] else None,
                    "contact_sheet": report["contact_sheet"], "job": layout.job_record,
                    "dataset": layout.dataset_folder if dataset else None},
    }
    try:
        failpoint("finish_before_record")
        run.check_lease()
        records.write_job_record(config, summary)
        run.recorded = True
    except OSError as exc:
        raise JobError(f"cannot write {layout.job_record}: {type(exc).__name__}: {exc}") from None
    return summary


def _why_not_packed(config: JobConfig, error: str | None, stopped_early: str | None) -> str | None:
    """Why this run leaves the dataset as it is (None: it packs). A partial run never replaces the dataset of the
    whole manifest: ``--limit`` and ``--smoke-test`` runs leave it, and ``ddim-edit pack OUTPUT`` packs every row."""
    if not config.pack:
        return "--no-pack"
    if error is not None:
        return "the run failed"
    if stopped_early:
        return "the run stopped early"
    if config.limit is not None:
        return (f"--limit {config.limit}: a partial run leaves the dataset of the whole manifest as it is; "
                "`ddim-edit pack OUTPUT` packs every row")
    return None


def pack_dataset(run: Run, index: ledger.LedgerIndex, unique: np.ndarray, card: dict) -> PackResult:
    """The edited dataset under OUTPUT/dataset (skipped when nothing changed since the last packing)."""
    config = run.config
    result = pack(run.layout, unique, config.storage_options, parse_size(config.max_shard_size), card, index,
                  guard=run.check_lease)
    if result.skipped:
        log.info("dataset: unchanged since the last packing (%d rows in %d files)", result.rows, result.files)
    else:
        log.info("dataset: %d rows in %d files, %.1f MB, under %s", result.rows, result.files, result.bytes / 1e6,
                 run.layout.dataset_folder)
    return result


def sample_fraction(rows: int, total: int) -> float:
    """The fraction of ids (by hash) that makes a sample of about ``rows`` of ``total``."""
    return min(1.0, rows / max(total, 1))


def main(argv: list[str] | None = None) -> int:
    """``ddim-edit run``: exit 0 when every row is accounted for, 2 when the job cannot run, 3 when stopped early,
    4 when rows of the manifest have no result row."""
    from ddim_worker.job.args import parse_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = parse_args(argv)
    try:
        summary = run_job(config)
    except JobError as exc:
        print(f"ddim-edit: error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    missing = f", {summary['missing']} MISSING" if summary["missing"] else ""
    print(f"ddim-edit: {summary['total']} rows: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} skipped{missing}; {summary['computed']} computed in {summary['wall_seconds']:.1f}s "
          f"({summary['rows_per_second'] or 0:.2f} rows/s), {summary['inversions']} inversions")
    for name, uri in summary["outputs"].items():
        if uri:
            print(f"  {name:16s} {uri}")
    if summary["stopped_early"]:
        print(f"ddim-edit: {summary['stopped_early']}", file=sys.stderr)
        return 3
    if summary["missing"]:
        print(f"ddim-edit: error: {summary['missing']} of {summary['total']} manifest rows have no result row; "
              "rerun the same command to finish them", file=sys.stderr)
        return 4
    return 0
