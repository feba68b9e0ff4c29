"""What a run says about itself (``job.json`` and the CLI's last lines), built from the run's state in one place."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ddim_worker.job import records
from ddim_worker.job.run_state import Run
from ddim_worker.rows import FAILED, FILTERED, OK, SKIPPED


def state(run: Run) -> str:
    if run.error:
        return "failed"
    if run.stopped_early:
        return "stopped"
    return "incomplete" if run.counts.get("missing") else "finished"


def build_summary(run: Run) -> dict[str, Any]:
    """The summary ``job.json`` records: counts are the table's (the ledger's winners over the manifest)."""
    config, layout, tally, plan, counts = run.config, run.layout, run.tally, run.plan, run.counts
    wall = time.monotonic() - run.started
    computed = int(tally.computed.sum())
    dataset = run.dataset
    return {
        "state": state(run),
        "error": run.error,
        # the table's, over the manifest (filtered: edited and scored, no candidate passed; not in the dataset)
        "counts": {OK: counts[OK], FILTERED: counts[FILTERED], FAILED: counts[FAILED], SKIPPED: counts[SKIPPED]},
        # manifest rows with no result row (a job that failed before reaching them): a run with any exits non-zero
        "missing": counts["missing"],
        "total": run.manifest.total,
        "done_before": run.done_before,  # ok in an earlier run: skipped, their results kept
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
        "ledger_scans": run.scans,  # reads of the ledger's key columns this run made
        "results_rows_outside_manifest": run.stale,  # rows of ids the manifest no longer has (--prune-stale)
        "results_rows_pruned": run.pruned,
        # decided from the cluster this run found (never in ``config``: a rerun decides again)
        "actors": plan.actors,
        "max_actors": plan.max_actors,  # None: the pool grows with the cluster
        "gpus_per_actor": plan.gpus_per_actor,
        "batch_size": plan.batch_size,
        "bytes_written": tally.bytes_written(dataset.bytes if dataset and not dataset.skipped else 0, computed),
        "dataset": dataset.as_dict() if dataset else None,
        "dataset_not_packed": run.not_packed,
        "command": records.command_line(config),
        "config": records.recorded_config(config),  # rerun: --config job.json
        "model": config.model,
        "model_revision": run.hub_commit,
        "model_fingerprint": run.fingerprint,
        "scorer": {"model": config.scorer, "fingerprint": run.scorer_fingerprint,
                   "thresholds": dataclasses.asdict(config.thresholds())} if config.scorer else None,
        "dtype": _dtype(tally.dtypes, plan.dtype),
        "versions": records.versions(),
        "outputs": {"images": layout.folder("edited"), "results": layout.results_folder, "latents": layout.latents,
                    "failed_manifest": run.failed_uri,
                    "report": run.report["pages"][0] if run.report["pages"] else None,
                    "contact_sheet": run.report["contact_sheet"], "job": layout.job_record,
                    "dataset": layout.dataset_folder if dataset else None},
    }


def _dtype(ran: set[str], planned: str) -> Any:
    """The dtype the actors ran (one, or the sorted list when they differed), else the planned one."""
    return sorted(ran)[0] if len(ran) == 1 else (sorted(ran) or planned)


def cli_lines(summary: dict[str, Any]) -> list[str]:
    """What ``ddim-edit run`` prints on stdout at the end: the counts, then where each output is."""
    counts = summary["counts"]
    missing = f", {summary['missing']} MISSING" if summary["missing"] else ""
    filtered = f", {counts['filtered']} filtered" if counts.get("filtered") else ""
    lines = [f"ddim-edit: {summary['total']} rows: {counts['ok']} ok{filtered}, {counts['failed']} failed, "
             f"{counts['skipped']} skipped{missing}; {summary['computed']} computed in "
             f"{summary['wall_seconds']:.1f}s ({summary['rows_per_second'] or 0:.2f} rows/s), "
             f"{summary['inversions']} inversions"]
    return lines + [f"  {name:16s} {uri}" for name, uri in summary["outputs"].items() if uri]
