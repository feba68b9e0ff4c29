"""Editing the rows left to do: the Ray Data stream, attempt after attempt, and the rows a stopped run never ran.

A lost node or a dead actor aborts Ray Data's whole dataset; the driver then runs what is still left as the next
attempt (a new generation), up to ``--max-attempts`` aborts. Engine actors that cannot start while others work (a
bad node) cost an attempt that is not counted; a model no actor can load ends the job.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any

from ddim_worker import storage
from ddim_worker.errors import root_cause
from ddim_worker.job import pipeline, shards
from ddim_worker.job.run_state import JobError, Run
from ddim_worker.job.source import SourceContext

log = logging.getLogger("ddim_edit.job")

#: Longest wait, after a stop, for results shards that tasks past the stop marker are still writing (a token each).
STOP_WAIT_S = 60.0

#: Computed rows before --max-failed-fraction is judged (a first failed row alone must not stop a job).
MIN_ROWS_FOR_FAILED_FRACTION = 10


def _put(value: Any) -> Any:
    import ray

    return ray.put(value)


def is_setup_failure(exc: BaseException) -> bool:
    """The engine actors cannot start (model load failed)."""
    chain, seen = [exc], set()
    while chain[-1] is not None and id(chain[-1]) not in seen:
        seen.add(id(chain[-1]))
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return any("ModelLoadError" in repr(e) or "cannot load model" in str(e) for e in chain if e is not None)


def run_attempts(run: Run) -> None:
    """Run the rows left to do through Ray Data (``run.index``: the ledger as the run found it); after an abort,
    again over what is still left, as the next attempt."""
    aborts = 0
    for attempt in itertools.count(1):
        run.attempts = attempt
        if attempt > 1:
            run.scan()
        run.generation = shards.generation_name(run.number, attempt)
        run.ctx = dataclasses.replace(run.ctx, generation=run.generation,
                                      stop_marker=run.layout.stop_marker(run.generation))
        seen_before = run.tally.rows_seen
        try:
            _stream(run)
            return
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - a lost node or dead actor aborts Ray Data's whole dataset
            aborts += _judge_abort(run, exc, attempt, aborts, progressed=run.tally.rows_seen > seen_before)


def _stream(run: Run) -> None:
    """One attempt: stream the rows left through the pipeline, counting what comes back."""
    config = run.config
    run_ctx = dataclasses.replace(run.manifest.source_ctx, done=_put(run.index.done()))
    if _nothing_left(run, run_ctx):
        log.info("every row is done from its inputs already: no engine actor is started")
        return
    batches = iter(pipeline.build_dataset(config, run_ctx, run.ctx, run.plan, run.model, run.scorer).iter_batches(
        batch_size=None, batch_format="numpy"))
    try:
        for summary in batches:
            run.check_lease()
            run.progress.update(run.tally.add(summary))
            if _too_many_failed(run):
                storage.write_bytes(run.ctx.stop_marker, b"stop", config.storage_options)
                return
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()  # stops the stream's executor: no task starts after this


def _nothing_left(run: Run, run_ctx: SourceContext) -> bool:
    """Whether every row was finished by an earlier run from the inputs it has now: a rerun of a finished job then
    loads no model on any GPU. The ledger answers by id first (any row without a finished result: there is work); only
    when every id is done does a pass of the read stage (CPU tasks) check that no row's inputs changed."""
    if not len(run.manifest.keys) or not run.index.all_finished(run.manifest.keys):
        return False
    return pipeline.count_rows_to_do(run_ctx) == 0


def _too_many_failed(run: Run) -> bool:
    tally, limit = run.tally, run.config.max_failed_fraction
    if limit is None or int(tally.computed.sum()) < MIN_ROWS_FOR_FAILED_FRACTION:
        return False
    if tally.failed_seen / max(tally.rows_seen, 1) <= limit:
        return False
    run.stopped_early = (f"stopped early: {tally.failed_seen} of {tally.rows_seen} computed rows failed, over "
                         f"--max-failed-fraction {limit}")
    return True


def _judge_abort(run: Run, exc: Exception, attempt: int, aborts: int, progressed: bool) -> int:
    """Whether an aborted attempt is followed by another (returns the aborts it counts) or ends the job."""
    if is_setup_failure(exc):
        if not progressed:  # no engine actor could start: another attempt would fail the same way
            raise JobError(f"the engine could not start: {root_cause(exc)}") from None
        # some actors work and others cannot start (a bad node): another attempt, not counted against
        # --max-attempts; each such attempt makes progress, so they end
        log.warning("engine actors failed to start while others worked (%s); re-running the unfinished rows "
                    "(attempt %d)", root_cause(exc), attempt + 1)
        return 0
    if aborts + 1 >= run.config.max_attempts:
        raise JobError(f"dataset failed {aborts + 1} times; rerun the same command to resume: {root_cause(exc)}") \
            from exc
    log.warning("dataset aborted (%s); re-running the unfinished rows (attempt %d, abort %d of %d)",
                root_cause(exc), attempt + 1, aborts + 1, run.config.max_attempts)
    return 1


def _wait_for_inflight(run: Run) -> None:
    """After a stop: wait until no task of this generation is still writing a shard (bounded by ``STOP_WAIT_S``)."""
    deadline = time.monotonic() + STOP_WAIT_S
    while time.monotonic() < deadline:
        writing = [n for n in storage.list_names(run.layout.inflight_folder, run.config.storage_options)
                   if n.startswith(run.generation + "-")]
        if not writing:
            return
        time.sleep(0.2)
    log.warning("results shards still being written %.0f s after the stop; going on", STOP_WAIT_S)


def record_not_run(run: Run) -> None:
    """After an early stop, every row with no result at all gets one (``skipped``), so the results stay complete.

    Tasks that were past the stop marker finish their shard first (the driver waits for their tokens); rows that
    have a result from an earlier run (failed, say) keep it.
    """
    _wait_for_inflight(run)
    finished = run.scan().states(run.manifest.keys) > 0
    not_run = dataclasses.replace(run.manifest.source_ctx, finished=_put(finished),
                                  not_run="not run: " + run.stopped_early)
    for _ in pipeline.record_rows(not_run, dataclasses.replace(run.ctx, stop_marker=None)).iter_batches(
            batch_size=None, batch_format="numpy"):
        pass
