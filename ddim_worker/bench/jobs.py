"""The benchmark's rows through the whole Ray job (``ddim_worker.job.driver.run_job``), measured at steady state.

Ray is imported here only, when the job part runs: ``--no-ray`` (or no Ray installed) skips it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddim_worker.bench.config import PACKAGE_PARENT, BenchConfig
from ddim_worker.bench.inputs import EDIT_PROMPTS, RERUN_PROMPTS, SOURCE_PROMPT, group_pairs
from ddim_worker.bench.timers import rates
from ddim_worker.outputs import OutputLayout

log = logging.getLogger("ddim_edit.benchmark")

JOB_PARTS = ("cold", "warm", "grouped")


def steady_rows_per_s(folder: Path, batch_size: int) -> tuple[float, float] | tuple[None, None]:
    """(best, mean) rows/s once the pipeline is full, from the PNGs' modification times.

    Batch k ends when its last PNG is written; the interval between the ends of two consecutive batches is what one
    batch costs with fetching, the engine and writing overlapped. Mean: the rows after the first batch over the time
    from the first batch's last PNG to the last PNG. Best: the batch size over the shortest interval (as for the
    in-process engine, the least disturbed batch). Actor start, model load and the first batch's warm-up fall
    outside both."""
    mtimes = sorted(p.stat().st_mtime for p in Path(folder).rglob("*.png"))
    if len(mtimes) <= batch_size:
        return None, None
    span = mtimes[-1] - mtimes[batch_size - 1]
    ends = [mtimes[min(i, len(mtimes)) - 1] for i in range(batch_size, len(mtimes) + batch_size, batch_size)]
    sizes = [min(batch_size, len(mtimes) - i) for i in range(batch_size, len(mtimes), batch_size)]
    intervals = [b - a for a, b in zip(ends, ends[1:])]
    if span <= 0 or min(intervals) <= 0:
        return None, None
    best, _ = rates(sizes, intervals)
    return best, (len(mtimes) - batch_size) / span


def _write_manifest(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _read_results(layout: OutputLayout) -> list[dict]:
    """The counts' columns of the job's results (every shard)."""
    from ddim_worker.job.ledger import read_table

    table = read_table(layout, None, images=False)
    return table.select([c for c in ("inversion_passes", "cache_hit") if c in table.column_names]).to_pylist()


def _start_ray(cpus: int, gpus: int) -> None:
    import ray

    # Workers import ddim_worker from this checkout. The engine actor gets every core's thread (as the in-process
    # engine does); 2 logical CPUs more let the fetch (0.5 CPU) and write (1 CPU) stages run beside it.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")]))
    # Ray starts its workers at niceness 15, below every other process: on a CPU box whose cores are shared
    # (this one is), the engine actor then waits behind anything else while the in-process engine it is compared
    # with does not. Run them at the driver's priority, as Ray's own job supervisor does for job drivers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=cpus + 2, num_gpus=gpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING", object_store_memory=1 << 30)


def run_jobs(cfg: BenchConfig, model: str, images: list[np.ndarray], work: Path, fast_path: dict,
             parts: tuple[str, ...] = JOB_PARTS) -> dict:
    """The benchmark's rows through ``run_job`` on one local Ray instance (started here if none is): ``cold`` (the
    main rows), ``warm`` (the same images with new edit prompts, reading the latent cache ``cold`` wrote) and
    ``grouped`` (the 4 x 4 manifest, its own latent cache)."""
    if "warm" in parts and "cold" not in parts:
        raise ValueError("the warm job reads the latent cache the cold job writes")
    try:
        import ray
    except ImportError:
        return {"skipped": "ray is not installed"}
    root = work / "job"
    if root.exists():
        shutil.rmtree(root)
    (root / "images").mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / "images" / f"img{i}.png")
    cuda = torch.device(cfg.device).type == "cuda"
    cpus_per_actor = 1 if cuda else cfg.threads
    started_ray = not ray.is_initialized()
    if started_ray:
        _start_ray(cpus_per_actor, 1 if cuda else 0)
    # The job's actors run the main configuration's fast path (JobConfig passes it on to EditActor).
    job_fast_path = {k: fast_path[k] for k in ("channels_last", "attention", "compile_unet")}
    edit = cfg.edit_settings()
    base = dict(model=model, size=cfg.size, dtype=cfg.dtype, num_steps=edit.num_steps, start_step=edit.start_step,
                guidance_scale=edit.guidance_scale, inversion_guidance=edit.inversion_guidance, seed=edit.seed,
                actors=1, gpus_per_actor=1.0 if cuda else 0.0, cpus_per_actor=float(cpus_per_actor), overwrite=True,
                # one engine batch per actor task, as the in-process reference runs: the job's PNGs then come in
                # bursts of one batch, which is what the steady rate is measured from (grouping across batches is
                # measured by jobs/grouping_benchmark.py)
                calls_per_task=1, **job_fast_path)

    out: dict[str, Any] = {"fast_path_in_job": job_fast_path, "cpus_per_actor": cpus_per_actor,
                           "ray_cpus": cpus_per_actor + 2 if started_ray else None}
    try:
        shared_cache = root / "latents-shared"
        if "cold" in parts:
            pairs = [(i, EDIT_PROMPTS[i % len(EDIT_PROMPTS)]) for i in range(cfg.job_rows)]
            out["cold"] = _job_part(root, base, "cold", _manifest_rows(pairs, "c"), shared_cache, cfg.batch_size)
        if "warm" in parts:
            # two batches: the rerun is fast, and its ratio to cold is measured in-process too
            pairs = [(i, RERUN_PROMPTS[i % len(RERUN_PROMPTS)]) for i in range(min(cfg.job_rows, 2 * cfg.batch_size))]
            out["warm"] = _job_part(root, base, "warm", _manifest_rows(pairs, "w"), shared_cache, cfg.batch_size)
        if "grouped" in parts:
            # At the job's batch size when whole images fit in it (each batch then holds whole images: the driver
            # orders rows that share an inversion next to each other), else one image per batch.
            group_batch = cfg.batch_size if cfg.batch_size % cfg.group_prompts == 0 else cfg.group_prompts
            out["grouped"] = _job_part(root, base, "grouped", _manifest_rows(group_pairs(cfg), "g"),
                                       root / "latents-grouped", group_batch)
    finally:
        if started_ray:
            ray.shutdown()
    return out


def _job_part(root: Path, base: dict, name: str, rows: list[dict], latent_cache: Path, batch_size: int) -> dict:
    """One job of the benchmark through ``run_job``: its figures, and the counts its results table holds."""
    from ddim_worker.job.config import JobConfig
    from ddim_worker.job.driver import run_job

    manifest = _write_manifest(rows, root / f"manifest-{name}.parquet")
    layout = OutputLayout(str(root / f"out-{name}"))
    summary = run_job(JobConfig.from_flat({**base, "manifest": str(manifest), "output": layout.root,
                                           "latent_cache": str(latent_cache), "batch_size": batch_size}))
    results = _read_results(layout)
    steady, steady_mean = steady_rows_per_s(Path(layout.folder("edited")), batch_size)
    record = {
        "name": name, "rows": len(rows), "batch_size": batch_size,
        "wall_seconds": summary["wall_seconds"], "rows_per_second": summary["rows_per_second"],
        "steady_rows_per_s": steady, "steady_rows_per_s_all": steady_mean,
        "startup_seconds": (summary["wall_seconds"] - len(rows) / steady_mean) if steady_mean else None,
        "counts": summary["counts"], "computed": summary["computed"], "inversions": summary["inversions"],
        "cache_hits": summary["cache_hits"], "unet_passes": summary["unet_passes"],
        "results_rows_inverted": sum(1 for r in results if (r.get("inversion_passes") or 0) > 0),
        "results_inversion_passes": sum(int(r.get("inversion_passes") or 0) for r in results),
        "results_cache_hits": sum(1 for r in results if r.get("cache_hit")),
    }
    log.info("job %-8s %2d rows batch %d: %.1fs wall (%.3f rows/s with start-up), steady %s rows/s, "
             "%d inversions, %d cache hits", name, len(rows), batch_size, record["wall_seconds"],
             record["rows_per_second"] or 0, f"{steady:.3f}" if steady else "n/a", record["inversions"],
             record["cache_hits"])
    return record

def _manifest_rows(pairs: list[tuple[int, str]], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{n}-img{i}", "image_url": f"images/img{i}.png", "source_prompt": SOURCE_PROMPT,
             "edit_prompt": prompt} for n, (i, prompt) in enumerate(pairs)]
