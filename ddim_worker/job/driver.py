"""The job's driver: check, take the output's lease, start the stream, count what comes back, record the end.

Every manifest row ends as one result row in the ``results/`` ledger: ``ok``, ``failed`` (with an ``error_code``)
or ``skipped`` (not run: the job stopped early). Rows an earlier run finished from the same inputs keep their result
and are not redone. The counts the driver reports are read back from the ledger, so they are the table's. The
driver's memory does not grow with the manifest beyond a few bytes a row (id hashes, a state per row).

A run is numbered steps over one state (``run_state.Run``):

1. ``_prepare``: the model, the manifest's footers, the output's compatibility (no Ray; nothing written)
2. ``_claim``: the run's number, stale files, ``--overwrite``, ``job.json`` says "running"
3. ``_start``: Ray, the engine actors' plan, the manifest's ids
4. ``_resume``: the ledger as it stands (compacted), what is done already
5. ``_edit``: the rows left, attempt after attempt (``attempts``); after an early stop, the rows not run
6. ``_settle``: compaction and pruning, the counts, ``failed.parquet``
7. ``_report``, 8. ``_pack``, 9. ``_record`` (``job.json``, built by ``summary.build_summary``)
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddim_worker import storage
from ddim_worker.errors import root_cause
from ddim_worker.failpoints import failpoint
from ddim_worker.job import attempts, cluster, ledger, manifest_passes, records, shards
from ddim_worker.job.compat import IncompatibleOutput, check_compatible, record_identity
from ddim_worker.job.config import JobConfig
from ddim_worker.job.lease import Lease, LeaseHeld, check_free
from ddim_worker.job.pack import PackError, PackResult, card_facts, pack
from ddim_worker.job.run_state import JobError, LeaseLost, Manifest, Progress, Run, Tally
from ddim_worker.job.sizes import parse_size
from ddim_worker.job.source import SourceContext, find_duplicates, plan_source
from ddim_worker.job.summary import build_summary, cli_lines
from ddim_worker.manifest import ManifestError, ledger_key, parse_column_map
from ddim_worker.model_source import check_model, check_scorer, model_fingerprint
from ddim_worker.core.models import ModelLoadError
from ddim_worker.outputs import STOP_MARKER_PREFIX, OutputLayout
from ddim_worker.rows import FAILED, FILTERED, OK, SKIPPED
from ddim_worker.job.stages import StageContext

__all__ = ["JobError", "LeaseLost", "run_job", "main", "take_lease", "index_manifest", "take_run_number"]

log = logging.getLogger("ddim_edit.job")

#: Result rows the report shows (a sample by id hash, at scale): its pages stay bounded.
REPORT_ROWS = 1000

#: Rows whose input (and, with --no-save-images, edited) images are kept for the report's pictures: the contact
#: sheet shows 64 of them. Every other input is written only with --save-inputs.
REPORT_IMAGES = 100

#: Temp files in a shared latent cache older than this are a killed writer's, never a write in flight.
STALE_TEMP_AGE_S = 3600.0


def check_model_or_fail(config: JobConfig) -> tuple[str, str | None]:
    """(model as the actors load it, resolved Hub commit): local folders made absolute (actors may run elsewhere),
    Hub ids resolved, and the scheduler checked, all before Ray starts."""
    try:
        commit = check_model(config.model, config.storage_options, revision=config.revision)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from None
    local = Path(config.model).expanduser()
    return (str(local.resolve()) if local.is_dir() else config.model), commit



def check_scorer_or_fail(config: JobConfig) -> tuple[str | None, str | None]:
    """(scorer as the actors load it, its fingerprint), checked before Ray starts like the model: a folder that is
    not a CLIP model's ends the job with one line. No scorer: (None, None)."""
    if not config.scorer:
        return None, None
    try:
        return check_scorer(config.scorer, config.storage_options)
    except ModelLoadError as exc:
        raise JobError(f"--scorer: {exc}") from None


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
    layout = OutputLayout(config.output, config.latent_cache)
    lease = take_lease(config, layout)
    try:
        return _run_job(Run(config, layout, lease))
    except (KeyboardInterrupt, Exception):
        # Whatever broke while the lease was lost (the interrupt itself, a store that went away mid-write) is the
        # lost lease: one line, exit 2, nothing more written.
        if (reason := lease.lost_reason()) is not None:
            raise LeaseLost(f"this run stopped writing to {config.output}: {reason}") from None
        raise
    finally:
        lease.release()


def _run_job(run: Run) -> dict[str, Any]:
    """The steps after the lease. Whatever ends the run, ``job.json`` says so: the counts (``_record``) or, for a
    run that failed before it could count, the error (an earlier run's record never reads as this run's)."""
    try:
        for step in (_prepare, _claim, _start, _resume, _edit, _settle, _report, _pack):
            step(run)
        summary = _record(run)
    except LeaseLost:
        raise  # the output is another run's now: write nothing more
    except Exception as exc:
        if not run.recorded and not run.lease.lost:
            try:
                records.mark_failed(run.config, run.lease.record.run_id, run.number,
                                    str(exc) if isinstance(exc, JobError) else root_cause(exc))
            except OSError:
                pass  # the original error is the one to report
        raise
    if run.error is not None:
        raise JobError(run.error)
    return summary


def _prepare(run: Run) -> None:
    """1. Everything that needs no Ray and writes nothing: model, manifest footers, the output's compatibility."""
    config = run.config
    run.model, run.hub_commit = check_model_or_fail(config)
    run.scorer, run.scorer_fingerprint = check_scorer_or_fail(config)
    try:
        run.source = plan_source(config.manifest, parse_column_map(config.columns), config.storage_options,
                                 config.limit)
    except (ManifestError, OSError) as exc:
        raise JobError(f"cannot read manifest {config.manifest}: {exc}") from None
    if config.prune_stale and config.limit is not None:
        raise JobError("--prune-stale needs the whole manifest: with --limit it would delete the rows past the limit")
    run.fingerprint = model_fingerprint(run.model, config.storage_options, config.revision, run.hub_commit)
    try:
        check_compatible(config, run.layout, run.fingerprint, results_schema(config, run.source))
    except IncompatibleOutput as exc:
        raise JobError(str(exc)) from None
    except OSError as exc:
        raise JobError(f"cannot read the results under {config.output}: {exc}") from None


def _claim(run: Run) -> None:
    """2. The run's number (before anything is deleted: it never repeats), stale files, ``--overwrite``, and
    ``job.json`` saying the run is on."""
    config, layout = run.config, run.layout
    try:
        run.check_lease()
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
        record_identity(config, layout, run.fingerprint)
    except OSError as exc:
        raise JobError(f"cannot write to --output {config.output}: {exc}") from None


def _start(run: Run) -> None:
    """3. Ray, the engine actors' plan, the manifest's ids, and what every stage task needs to know."""
    config, source = run.config, run.source
    cluster.init_ray(config)
    run.plan = cluster.plan_engine(config)
    run.manifest = index_manifest(SourceContext(source, config.edit, config.max_prompt_chars))
    run.ctx = StageContext(
        layout=run.layout, manifest=source.files, model=config.model, model_fingerprint=run.fingerprint,
        dtype=run.plan.dtype, size=config.engine.size, storage_options=config.storage_options,
        policy=config.policy(), max_pixels=config.max_pixels, min_side=config.min_image_side,
        resume=not config.overwrite, carried=source.carried_schema, results_schema=results_schema(config, source),
        embed_images=embeds_images(config), save_images=config.save_images, save_inputs=config.save_inputs,
        image_sample=sample_fraction(REPORT_IMAGES, run.manifest.total) if config.report else 0.0,
        run_id=run.lease.record.run_id)
    log.info("manifest %s: %d rows in %d row groups, %d files; %d repeated ids", config.manifest,
             source.total_rows, len(source.groups), len(source.files.files), len(run.manifest.source_ctx.duplicates))


def _resume(run: Run) -> None:
    """4. The ledger as it stands: rewrite what a killed run left repeated, count what is done already."""
    before = run.scan()
    run.check_lease()
    if compacted := ledger.compact(run.layout, before, run.config.storage_options):
        log.info("results: %d repeated rows from earlier runs compacted away", compacted)
        run.scan()
    before = run.index.counts(run.manifest.unique_keys())
    run.done_before = before[OK] + before[FILTERED]
    run.tally = Tally(run.source.total_rows)
    run.progress = Progress(run.source.total_rows, run.done_before)


def _edit(run: Run) -> None:
    """5. The rows left, attempt after attempt; after an early stop, a ``skipped`` row for every row not run. An
    error that ends the stream is the run's ``error``: what was done is still recorded."""
    try:
        attempts.run_attempts(run)
        if run.stopped_early:
            log.error(run.stopped_early)
            attempts.record_not_run(run)
    except LeaseLost:
        raise
    except JobError as exc:
        run.error = str(exc)
    run.progress.update([], force=True)


@contextlib.contextmanager
def _writing_records(run: Run, what: str) -> Iterator[None]:
    """A finish step's writes: the lease checked first, and every failure to write one ``JobError`` naming ``what``."""
    run.check_lease()
    try:
        yield
    except JobError:
        raise
    except PackError as exc:
        raise JobError(f"cannot pack the edited dataset under {run.layout.dataset_folder}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - OSError, and the store clients' own errors (botocore's are not OSError)
        run.check_lease()  # a store gone away may be why: then this run has lost the output, and says that
        raise JobError(f"cannot write {what} under {run.config.output}: {type(exc).__name__}: {exc}") from None


def _settle(run: Run) -> None:
    """6. Compaction (and pruning with ``--prune-stale``), the counts read back from the ledger, ``failed.parquet``."""
    config, layout = run.config, run.layout
    with _writing_records(run, "the job's records"):
        storage.remove(layout.stop_marker(run.generation), config.storage_options)
        unique = run.manifest.unique_keys()
        outside = run.scan().outside(unique)
        run.check_lease()
        run.pruned = ledger.compact(layout, run.index, config.storage_options,
                                    drop=outside if config.prune_stale else None)
        if run.pruned:
            outside = run.scan().outside(unique)
        run.stale = int(outside.sum())
        if run.stale:
            log.warning("results hold %d rows of ids this run's manifest does not have (kept; --prune-stale "
                        "deletes them)", run.stale)
        run.counts = run.index.counts(unique)
        states = run.index.states(run.manifest.keys)
        # the rows to rerun: failed ones, and any the run never reached (a job that ended in an error)
        run.check_lease()
        run.failed_uri = records.write_failed_manifest(config, run.manifest.source_ctx,
                                                       (states == ledger.STATUS_RANK[FAILED]) | (states == 0))


def _report(run: Run) -> None:
    """7. The report's pages and contact sheet, over a sample of the rows."""
    config = run.config
    if not config.report or run.error is not None:
        return
    from ddim_worker.report import write_report

    with _writing_records(run, "the report"):
        sample = ledger.sample_rows(run.layout, run.index, config.storage_options,
                                    sample_fraction(REPORT_ROWS, run.manifest.total), run.manifest.unique_keys())
        run.check_lease()
        run.report = write_report(config.output, sample, config.storage_options)


def _pack(run: Run) -> None:
    """8. The edited dataset, unless this run must leave it as it is (``_why_not_packed``)."""
    config = run.config
    run.not_packed = _why_not_packed(config, run.error, run.stopped_early)
    if run.not_packed:
        log.info("dataset: not packed (%s)", run.not_packed)
        return
    card = card_facts(config, model_revision=run.hub_commit, fingerprint=run.fingerprint, dtype=run.plan.dtype,
                      failed=run.counts[FAILED], skipped=run.counts[SKIPPED], filtered=run.counts[FILTERED],
                      scorer_fingerprint=run.scorer_fingerprint, command=records.command_line(config),
                      version=records.versions().get("ddim-edit", ""))
    with _writing_records(run, "the edited dataset"):
        run.dataset = pack_dataset(run, run.index, run.manifest.unique_keys(), card)


def _record(run: Run) -> dict[str, Any]:
    """9. ``job.json``: the summary, built in one place (``summary.build_summary``)."""
    summary = build_summary(run)
    failpoint("finish_before_record")
    with _writing_records(run, run.layout.job_record):
        records.write_job_record(run.config, summary)
    run.recorded = True
    return summary


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


def results_schema(config: JobConfig, source: Any) -> Any:
    """The results' schema for this job: with ``--no-save-images`` the PNGs travel in the results (embedded)."""
    return shards.results_schema(source.carried_schema, embeds_images(config))


def embeds_images(config: JobConfig) -> bool:
    return config.embed_images or not config.save_images


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
    print("\n".join(cli_lines(summary)))
    if summary["stopped_early"]:
        print(f"ddim-edit: {summary['stopped_early']}", file=sys.stderr)
        return 3
    if summary["missing"]:
        print(f"ddim-edit: error: {summary['missing']} of {summary['total']} manifest rows have no result row; "
              "rerun the same command to finish them", file=sys.stderr)
        return 4
    return 0
