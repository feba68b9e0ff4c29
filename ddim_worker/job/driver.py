"""The job's driver: check, plan, run the Ray Data pipeline with retries, account for every row, write records.

Every manifest row ends as one result row: ``ok``, ``failed`` (with an ``error_code``) or ``skipped`` (done by an
earlier run). A lost node or dead actor aborts Ray Data's dataset; the driver then re-runs only the unfinished rows.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from ddim_worker import storage
from ddim_worker.job import engine_pool, records
from ddim_worker.job.config import JobConfig
from ddim_worker.job.plan import Plan, plan_rows
from ddim_worker.manifest import ManifestError
from ddim_worker.models import ModelLoadError, check_model, model_fingerprint
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, OK, SKIPPED
from ddim_worker.stages import StageContext

log = logging.getLogger("ddim_edit.job")

#: How often the driver rewrites results/results.parquet while the job runs, so a killed driver loses little.
CHECKPOINT_SECONDS = 30.0

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

    def update(self, statuses: list[str], force: bool = False) -> None:
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


def _run_rows(config: JobConfig, plan: Plan, ctx: StageContext, batch_size: int, model: str,
              progress: Progress, decided: list[dict]) -> tuple[dict[str, dict], str | None, int]:
    """Run the plan's work through Ray Data, re-running unfinished rows after an abort; (results, stopped, tries)."""
    layout = ctx.layout
    results: dict[str, dict] = {}
    stopped_early = None
    remaining = plan.work
    attempts = 0
    for attempt in range(1, config.max_attempts + 1):
        attempts = attempt
        last_checkpoint = time.monotonic()
        try:
            dataset = engine_pool.build_dataset(config, remaining, ctx, batch_size, model)
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
                for row in rows:
                    results[str(row["id"])] = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                progress.update([r["status"] for r in rows])
                if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                    records.write_results(config, decided + list(results.values()))
                    last_checkpoint = time.monotonic()
                if config.max_failed_fraction is not None and progress.computed >= MIN_ROWS_FOR_FAILED_FRACTION:
                    failed = sum(r["status"] == FAILED for r in results.values())
                    if failed / len(results) > config.max_failed_fraction:
                        stopped_early = (f"stopped early: {failed} of {len(results)} computed rows failed, over "
                                         f"--max-failed-fraction {config.max_failed_fraction}")
                        break
            break
        except Exception as exc:  # noqa: BLE001 - a lost node or dead actor aborts Ray Data's whole dataset
            if _is_setup_failure(exc):
                raise JobError(f"the engine could not start: {_root_cause(exc)}") from None
            finished_ids = set(results) | {
                n.removesuffix(".png")
                for n in storage.list_names(layout.folder("edited"), config.storage_options, suffix=".png")}
            remaining = [r for r in remaining if r["id"] not in finished_ids]
            for r in plan.work:  # rows written before the abort but not yet reported: done, not redone
                if r["id"] in finished_ids and r["id"] not in results:
                    results[r["id"]] = {**r, "status": OK, "output_uri": layout.edited(r["id"]), "error": None,
                                        "error_code": None}
            if attempt == config.max_attempts or not remaining:
                if remaining:
                    raise JobError(f"dataset failed {attempt} times, {len(remaining)} rows unfinished; rerun the "
                                   f"same command to resume: {_root_cause(exc)}") from exc
                break
            log.warning("dataset aborted (%s); re-running the %d unfinished rows (attempt %d of %d)",
                        _root_cause(exc), len(remaining), attempt + 1, config.max_attempts)
    return results, stopped_early, attempts


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
        plan = plan_rows(config)
    except (ManifestError, OSError) as exc:
        raise JobError(f"cannot read manifest {config.manifest}: {exc}") from None
    fingerprint = model_fingerprint(model, config.storage_options, config.revision, hub_commit)
    decided = list(plan.finished)
    progress = Progress(plan.total, len(decided))
    log.info("manifest %s: %d rows, %d to compute, %d already done, %d invalid", config.manifest, plan.total,
             len(plan.work), sum(r["status"] == SKIPPED for r in decided), sum(r["status"] == FAILED for r in decided))
    results: dict[str, dict] = {}
    stopped_early, attempts, dtype, batch_size = None, 0, None, None
    if plan.work:
        engine_pool.init_ray(config)
        config.gpus_per_actor = engine_pool.cluster_gpus_per_actor(config)
        device = engine_pool.probe_engine_device(config) if config.device == "cuda" else None
        dtype = device.dtype if device else _cpu_dtype(config)
        batch_size = engine_pool.batch_size_for(config, device)
        ctx = StageContext(layout=layout, manifest=plan.manifest, model=config.model, model_fingerprint=fingerprint,
                           dtype=dtype, size=config.engine.size, image_column=plan.image_column,
                           storage_options=config.storage_options, policy=config.policy(),
                           max_pixels=config.max_pixels, min_side=config.min_image_side)
        results, stopped_early, attempts = _run_rows(config, plan, ctx, batch_size, model, progress, decided)
    if stopped_early:
        log.error(stopped_early)
        for r in plan.work:
            if r["id"] not in results:
                results[r["id"]] = {**r, "status": SKIPPED, "error": "not run: " + stopped_early}
    all_rows = decided + list(results.values())
    progress.update([], force=True)
    results_uri = records.write_results(config, all_rows)
    failed_uri = records.write_failed_manifest(config, all_rows)
    report = {"pages": [None], "contact_sheet": None}
    if config.report:
        from ddim_worker.report import write_report

        report = write_report(config.output, all_rows, config.storage_options)
    wall = time.monotonic() - started
    summary = {
        "counts": {s: sum(r["status"] == s for r in all_rows) for s in (OK, FAILED, SKIPPED)},
        "total": len(all_rows),
        "computed": len(results),
        "inversions": sum(1 for r in results.values() if (r.get("inversion_passes") or 0) > 0),
        "cache_hits": sum(1 for r in results.values() if r.get("cache_hit")),
        "unet_passes": sum(int(r.get("unet_passes") or 0) for r in results.values()),
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(len(results) / wall, 4) if wall > 0 else None,
        "stopped_early": stopped_early,
        "attempts": attempts,  # > 1: Ray aborted the dataset (lost node) and the driver re-ran unfinished rows
        "batch_size": batch_size,
        "config": {k: v for k, v in config.flat().items() if k != "storage_options"},  # rerun: --config job.json
        "model": config.model,
        "model_revision": hub_commit,
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "versions": records.versions(),
        "outputs": {"images": layout.folder("edited"), "results": results_uri, "latents": layout.latents,
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
