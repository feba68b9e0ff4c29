"""The ddim-edit batch job: Parquet manifest in; edited images, cached latents and a results table out.

    ddim-edit run MANIFEST --output URI [--model PATH_OR_ID] [...]
    python jobs/edit.py MANIFEST --output URI [...]          # the same, e.g. under `ray job submit`

Pipeline (Ray Data): manifest rows -> ``prepare_batch`` on CPU tasks (fetch, decode, preprocess, cache lookup) ->
``EditActor`` pool (the engine, loaded once per actor; GPUs) -> ``write_batch`` on CPU tasks (PNG + latents) -> the
driver, which shows progress, checkpoints the results table and writes ``job.json`` at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python jobs/edit.py` (e.g. ray job submit --working-dir .)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from ddim_worker.manifest import (
    DEFAULT_MAX_PROMPT_CHARS,
    ManifestError,
    ManifestFiles,
    RowDefaults,
    parse_column_map,
    read_rows,
    row_id,
    row_settings,
)
from ddim_worker.models import ModelLoadError, check_model, choose_dtype, model_fingerprint
from ddim_worker.rows import FAILED, OK, SKIPPED, RowError, results_table
from ddim_worker.stages import StageContext, prepare_batch, write_batch
from ddim_worker.url_policy import FetchPolicy

log = logging.getLogger("ddim_edit.job")

#: Rows per engine call when --batch-size is not given (on GPU: when no engine GPU says how much memory it has free):
#: enough to keep a GPU busy at 512 px in bf16, small enough for a CPU run to show progress.
DEFAULT_BATCH_SIZE = {"cuda": 8, "cpu": 4}

#: How often the driver rewrites results/results.parquet while the job runs, so a killed driver loses little.
CHECKPOINT_SECONDS = 30.0


@dataclass
class JobConfig:
    manifest: str
    output: str
    model: str = "runwayml/stable-diffusion-v1-5"
    steps: int = 50
    start_step: int = 10
    guidance: float = 3.5
    inversion_guidance: float = 3.5
    negative_prompt: str = ""
    inversion: str = "ddim"
    size: int = 512
    batch_size: int | None = None
    actors: int = 1
    gpus_per_actor: float = 0.0
    cpus_per_actor: float = 1.0
    dtype: str = "auto"
    columns: str | None = None
    latent_cache: str | None = None
    storage_options: dict = field(default_factory=dict)
    address: str | None = None
    limit: int | None = None
    seed: int = 0
    eta: float = 0.0
    overwrite: bool = False
    allow_private_network: bool = False
    allow_local_files: bool = False
    fetch_timeout: float = 30.0
    fetch_retries: int = 3
    max_download_bytes: int = 50 * 2**20
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_image_side: int = DEFAULT_MIN_SIDE
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_failed_fraction: float | None = None
    max_attempts: int = 3
    engine_resources: dict = field(default_factory=dict)  # custom Ray resources each engine actor needs
    measure_fidelity: bool = False
    report: bool = True
    # GPU fast path of the engine actors (each measured on and off by jobs/benchmark.py).
    attention: str = "sdpa"
    channels_last: bool = False
    compile_unet: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"

    @property
    def cache_root(self) -> str:
        return self.latent_cache or storage.join_uri(self.output, "latents")

    def defaults(self) -> RowDefaults:
        return RowDefaults(num_steps=self.steps, start_step=self.start_step, guidance_scale=self.guidance,
                           inversion_guidance=self.inversion_guidance, seed=self.seed,
                           negative_prompt=self.negative_prompt, inversion=self.inversion,
                           max_prompt_chars=self.max_prompt_chars)

    def policy(self) -> FetchPolicy:
        return FetchPolicy(allow_private_network=self.allow_private_network,
                           allow_local_files=self.allow_local_files, timeout_s=self.fetch_timeout,
                           retries=self.fetch_retries, max_bytes=self.max_download_bytes)


class JobError(RuntimeError):
    """The job as a whole cannot run (bad manifest, model or output): one clear message, no traceback per row."""


# -- planning: which rows run, which fail up front, which are already done ----------------------------------------

@dataclass
class Plan:
    work: list[dict]  # rows to compute, grouped so rows sharing an inversion are neighbours
    finished: list[dict]  # result rows decided by the driver: invalid rows (failed) and done rows (skipped)
    total: int
    image_column: str | None
    manifest: ManifestFiles


def _previous_results(config: JobConfig) -> dict[str, dict]:
    uri = storage.join_uri(config.output, "results", "results.parquet")
    try:
        data = storage.read_bytes(uri, config.storage_options)
    except (FileNotFoundError, OSError):
        return {}
    table = pq.read_table(pa.BufferReader(data))
    return {row["id"]: row for row in table.to_pylist()}


def plan_rows(config: JobConfig) -> Plan:
    mapping = parse_column_map(config.columns)
    records, manifest, columns = read_rows(config.manifest, mapping, config.storage_options, config.limit)
    defaults = config.defaults()
    done_ids = set() if config.overwrite else {
        name.removesuffix(".png")
        for name in storage.list_names(storage.join_uri(config.output, "images"), config.storage_options,
                                       suffix=".png")
    }
    previous = _previous_results(config) if done_ids else {}
    seen: dict[str, int] = {}
    work, finished = [], []
    for record in records:
        result = {k: record.get(k) for k in ("image_url", "source_prompt", "edit_prompt", "negative_prompt")}
        result["manifest_row"] = record["manifest_row"]
        try:
            if "row_error" in record:
                raise RowError(*record["row_error"])
            settings = row_settings(record, defaults)
            rid = row_id(record, settings)
        except RowError as exc:
            rid = str(record.get("id")) if record.get("id") is not None else None
            finished.append({**result, "id": rid, "status": FAILED, "error_code": exc.code, "error": exc.message})
            continue
        result.update(settings, id=rid)
        if rid in seen:
            finished.append({**result, "status": FAILED, "error_code": "duplicate_id",
                             "error": f"id {rid!r} is also manifest row {seen[rid]}; ids must be unique"})
            continue
        seen[rid] = record["manifest_row"]
        if rid in done_ids:
            before = previous.get(rid, {})
            finished.append({**before, **result, "status": SKIPPED, "error_code": None, "error": None,
                             "output_uri": storage.join_uri(config.output, "images", f"{rid}.png"),
                             "seconds": 0.0, "inversion_passes": 0, "sampling_passes": 0, "unet_passes": 0})
            continue
        ref = record.get("image_ref") or (-1, -1, -1)
        work.append({**result, "image_url": record.get("image_url"), "ref_file": ref[0], "ref_group": ref[1],
                     "ref_row": ref[2]})
    # Rows that share an image and inversion settings become neighbours, so they land in one engine batch and the
    # engine inverts them once (augmentation: one image, many edit prompts).
    work.sort(key=lambda r: (str(r["image_url"] or ""), r["ref_file"], r["ref_group"], r["ref_row"],
                             r["source_prompt"], r["negative_prompt"], r["num_steps"], r["inversion_guidance"],
                             r["inversion"], r["manifest_row"]))
    return Plan(work, finished, len(records), columns.get("image"), manifest)


# -- running ------------------------------------------------------------------------------------------------------

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


def _init_ray(config: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # No address: a new local instance ("local"), never a stale cluster recorded in /tmp/ray by `ray start`.
        address = config.address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=False)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints its own progress line
    context.execution_options.preserve_order = False


def _batch_size_from_gpu_memory(config: JobConfig, dtype: str, timeout_s: float = 60.0) -> int:
    """Rows per engine call from an engine GPU's free memory, asked of a Ray task with the actors' resources.

    Falls back to the fixed default when no such task answers within ``timeout_s`` (no GPU node yet: the autoscaler
    may still be adding one) or it sees no CUDA.
    """
    import ray
    import torch

    from ddim_worker import fastpath

    fallback = DEFAULT_BATCH_SIZE["cuda"]
    probe = ray.remote(fastpath.free_device_bytes).options(num_gpus=config.gpus_per_actor or 1, num_cpus=0,
                                                           resources=config.engine_resources or None)
    ref = probe.remote("cuda")
    try:
        free = ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a sizing hint only; the job goes on with the default
        ray.cancel(ref, force=True)
        log.warning("no engine GPU said how much memory it has free (%s); batch size %d", type(exc).__name__,
                    fallback)
        return fallback
    if not free:
        log.warning("the engine GPU reported no free memory (no CUDA in the worker?); batch size %d", fallback)
        return fallback
    batch = fastpath.batch_size_before_load(free, config.size, getattr(torch, dtype))
    log.info("batch size %d from %.1f GiB free on an engine GPU (%s, %d px)", batch, free / 2**30, dtype,
             config.size)
    return batch


def _dataset(config: JobConfig, rows: list[dict], ctx: StageContext, batch_size: int, model: str):
    import ray

    from ddim_worker.actor import EditActor

    table = pa.Table.from_pylist(rows)
    # Several blocks, so fetching, editing and writing overlap (streaming) instead of running one after the other.
    chunk = max(batch_size, 1)
    blocks = [table.slice(i, chunk) for i in range(0, table.num_rows, chunk)] or [table]
    ds = ray.data.from_arrow(blocks)
    # Fetching is I/O-bound: half a CPU per task lets two run per core. It also keeps the stage apart from the engine
    # actors (Ray Data fuses stages with equal resources), so engine actors never wait on the network.
    ds = ds.map_batches(prepare_batch, fn_kwargs={"ctx": ctx}, batch_size=batch_size, batch_format="numpy",
                        num_cpus=0.5)
    engine_cpus = 1 if config.gpus_per_actor > 0 else config.cpus_per_actor
    ds = ds.map_batches(
        EditActor,
        # Elastic between 1 and --actors: a job goes on when a node with an actor is lost and cannot be replaced.
        # Ray Data restarts dead engine actors and retries their tasks (max_restarts=-1, max_task_retries=-1).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.actors, initial_size=config.actors),
        fn_constructor_kwargs={"model": model, "size": config.size, "dtype": config.dtype,
                               "device": config.device, "storage_options": config.storage_options,
                               "num_threads": max(int(engine_cpus), 1), "eta": config.eta,
                               "batch_size": batch_size, "measure_fidelity": config.measure_fidelity,
                               "attention": config.attention, "channels_last": config.channels_last,
                               "compile_unet": config.compile_unet},
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=config.gpus_per_actor or None,
        num_cpus=engine_cpus,
        resources=config.engine_resources or None,
    )
    return ds.map_batches(write_batch, fn_kwargs={"ctx": ctx}, batch_size=batch_size, batch_format="numpy",
                          num_cpus=1)


def _write_results(config: JobConfig, rows: list[dict]) -> str:
    uri = storage.join_uri(config.output, "results", "results.parquet")
    sink = pa.BufferOutputStream()
    pq.write_table(results_table(rows), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), config.storage_options)
    return uri


def _resolve_model(config: JobConfig) -> str:
    """An absolute path for local folders (actors may run elsewhere), after checking the model is there."""
    try:
        check_model(config.model, config.storage_options)
    except ModelLoadError as exc:
        raise JobError(str(exc)) from None
    local = Path(config.model).expanduser()
    return str(local.resolve()) if local.is_dir() else config.model


def run_job(config: JobConfig) -> dict[str, Any]:
    """Run the whole job; returns the summary that is also written to ``job.json``."""
    started = time.monotonic()
    try:
        storage.check_writable(config.output, config.storage_options)
    except OSError as exc:
        raise JobError(f"cannot write to --output {config.output}: {exc}") from None
    model = _resolve_model(config)
    for prefix in {config.output, config.cache_root}:
        if removed := storage.remove_stale_temp_files(prefix, config.storage_options):
            log.warning("removed %d partial files a killed earlier run left under %s", removed, prefix)
    try:
        plan = plan_rows(config)
    except (ManifestError, OSError) as exc:
        raise JobError(f"cannot read manifest {config.manifest}: {exc}") from None
    fingerprint = model_fingerprint(model, config.storage_options)
    import torch

    dtype = str(choose_dtype(config.dtype, torch.device(config.device))).removeprefix("torch.")
    ctx = StageContext(output_uri=config.output, cache_root=config.cache_root, manifest=plan.manifest, model=config.model,
                       model_fingerprint=fingerprint, dtype=dtype, size=config.size, image_column=plan.image_column,
                       storage_options=config.storage_options, policy=config.policy(), max_pixels=config.max_pixels,
                       min_side=config.min_image_side)
    results: dict[str, dict] = {}
    decided = [r for r in plan.finished]
    progress = Progress(plan.total, len(decided))
    log.info("manifest %s: %d rows, %d to compute, %d already done, %d invalid", config.manifest, plan.total,
             len(plan.work), sum(r["status"] == SKIPPED for r in decided), sum(r["status"] == FAILED for r in decided))
    stopped_early = None
    attempts = 0
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE[config.device]
    if plan.work:
        _init_ray(config)
        if config.batch_size is None and config.device == "cuda":
            batch_size = _batch_size_from_gpu_memory(config, dtype)
        remaining = plan.work
        for attempt in range(1, config.max_attempts + 1):
            attempts = attempt
            last_checkpoint = time.monotonic()
            try:
                for batch in _dataset(config, remaining, ctx, batch_size, model).iter_batches(
                        batch_size=None, batch_format="numpy"):
                    rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
                    for row in rows:
                        results[str(row["id"])] = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                    progress.update([r["status"] for r in rows])
                    if time.monotonic() - last_checkpoint > CHECKPOINT_SECONDS:
                        _write_results(config, decided + list(results.values()))
                        last_checkpoint = time.monotonic()
                    if config.max_failed_fraction is not None and progress.computed >= 10:
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
                    n.removesuffix(".png") for n in storage.list_names(
                        storage.join_uri(config.output, "images"), config.storage_options, suffix=".png")}
                remaining = [r for r in remaining if r["id"] not in finished_ids]
                for r in plan.work:  # rows written before the abort but not yet reported: done, not redone
                    if r["id"] in finished_ids and r["id"] not in results:
                        results[r["id"]] = {**r, "status": OK, "output_uri": ctx.image_uri(r["id"]),
                                            "error": None, "error_code": None}
                if attempt == config.max_attempts or not remaining:
                    if remaining:
                        raise JobError(f"dataset failed {attempt} times, {len(remaining)} rows unfinished; rerun the "
                                       f"same command to resume: {_root_cause(exc)}") from exc
                    break
                log.warning("dataset aborted (%s); re-running the %d unfinished rows (attempt %d of %d)",
                            _root_cause(exc), len(remaining), attempt + 1, config.max_attempts)
            if stopped_early:
                break
    if stopped_early:
        log.error(stopped_early)
        for r in plan.work:
            if r["id"] not in results:
                results[r["id"]] = {**r, "status": SKIPPED, "error": "not run: " + stopped_early}
    all_rows = decided + list(results.values())
    progress.update([], force=True)
    results_uri = _write_results(config, all_rows)
    failed_uri = _write_failed_manifest(config, all_rows)
    report = {"pages": [None], "contact_sheet": None}
    if config.report:
        from ddim_worker.report import write_report

        report = write_report(config.output, all_rows, config.storage_options)
    wall = time.monotonic() - started
    counts = {s: sum(r["status"] == s for r in all_rows) for s in (OK, FAILED, SKIPPED)}
    summary = {
        "counts": counts,
        "total": len(all_rows),
        "computed": len(results),
        "inversions": sum(1 for r in results.values() if (r.get("inversion_passes") or 0) > 0),
        "cache_hits": sum(1 for r in results.values() if r.get("cache_hit")),
        "unet_passes": sum(int(r.get("unet_passes") or 0) for r in results.values()),
        "wall_seconds": round(wall, 3),
        "rows_per_second": round(len(results) / wall, 4) if wall > 0 else None,
        "stopped_early": stopped_early,
        "attempts": attempts,  # > 1: Ray aborted the dataset (lost node) and the driver re-ran unfinished rows
        "settings": {k: v for k, v in asdict(config).items() if k != "storage_options"},
        "model": config.model,
        "model_fingerprint": fingerprint,
        "dtype": dtype,
        "versions": _versions(),
        "outputs": {"images": storage.join_uri(config.output, "images"), "results": results_uri,
                    "latents": config.cache_root, "failed_manifest": failed_uri,
                    "report": report["pages"][0] if report["pages"] else None,
                    "contact_sheet": report["contact_sheet"],
                    "job": storage.join_uri(config.output, "job.json")},
    }
    storage.write_bytes(summary["outputs"]["job"], json.dumps(summary, indent=2, default=str).encode(),
                        config.storage_options)
    return summary


def _write_failed_manifest(config: JobConfig, rows: list[dict]) -> str | None:
    """``failed.parquet``: the failed rows' manifest rows, same columns as the input, to rerun only them."""
    failed_rows = sorted(r["manifest_row"] for r in rows if r["status"] == FAILED and r.get("manifest_row") is not None)
    uri = storage.join_uri(config.output, "failed.parquet")
    if not failed_rows:
        storage.remove(uri, config.storage_options)
        return None
    from ddim_worker.manifest import find_manifest_files

    import fsspec

    wanted = set(failed_rows)
    tables, offset = [], 0
    for file_uri in find_manifest_files(config.manifest, config.storage_options).files:
        with fsspec.open(file_uri, "rb", **config.storage_options) as handle:
            table = pq.read_table(handle)
        keep = [i for i in range(table.num_rows) if offset + i in wanted]
        offset += table.num_rows
        if keep:
            tables.append(table.take(keep))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(tables), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), config.storage_options)
    return uri


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


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ddim-edit", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> JobConfig:
    p = argparse.ArgumentParser(prog="ddim-edit run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("manifest", help="Parquet file, folder or glob (local or fsspec URL)")
    p.add_argument("--output", required=True, help="output prefix (local path, s3://..., any fsspec URL)")
    p.add_argument("--model", default=JobConfig.model, help="diffusers folder, hub id or s3:// folder (SD 1.x)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps n (default 50)")
    p.add_argument("--start-step", type=int, default=10, help="start step s: sampling runs over tau[s:] (10)")
    p.add_argument("--guidance", type=float, default=3.5, help="CFG scale while sampling (3.5)")
    p.add_argument("--inversion-guidance", type=float, default=3.5, help="CFG scale while inverting (3.5)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--inversion", default="ddim", help="ddim | negative-prompt | fixed-point:K | noise")
    p.add_argument("--size", type=int, default=512, help="square working size in pixels, a multiple of 8")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per engine call (default: GPU from its free memory, CPU 4)")
    p.add_argument("--actors", type=int, default=1, help="engine actors (one per GPU)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="default 1 when CUDA is visible, else 0")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPU actors: torch threads")
    p.add_argument("--dtype", default="auto", help="auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--columns", default=None, help="map your columns onto ours: image_url=URL,source_prompt=TEXT")
    p.add_argument("--latent-cache", default=None, help="latent cache prefix, shared between jobs "
                                                        "(default OUTPUT/latents)")
    p.add_argument("--storage-options", default="{}", help="JSON for fsspec, e.g. endpoint and keys for S3")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)")
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest rows")
    p.add_argument("--smoke-test", action="store_true", help="one row only (same as --limit 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true", help="redo rows whose outputs exist")
    p.add_argument("--allow-private-network", action="store_true",
                   help="let image URLs reach loopback/private/link-local addresses (off: SSRF protection)")
    p.add_argument("--allow-local-files", action="store_true",
                   help="let image paths reach local files outside the manifest's folder")
    p.add_argument("--fetch-timeout", type=float, default=30.0)
    p.add_argument("--fetch-retries", type=int, default=3)
    p.add_argument("--max-download-bytes", type=int, default=50 * 2**20)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--min-image-side", type=int, default=DEFAULT_MIN_SIDE)
    p.add_argument("--max-prompt-chars", type=int, default=DEFAULT_MAX_PROMPT_CHARS)
    p.add_argument("--max-failed-fraction", type=float, default=None,
                   help="stop early when more than this fraction of computed rows fail (default off)")
    p.add_argument("--engine-resources", default="{}",
                   help='custom Ray resources per engine actor, JSON, e.g. {"accelerator_type:A100": 0.01}')
    p.add_argument("--measure-fidelity", action="store_true",
                   help="resample each inversion with its source prompt: PSNR/SSIM/latent MSE per row (n-s passes)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip report.html and contact-sheet.png")
    p.add_argument("--attention", default="sdpa", choices=["sdpa", "math"],
                   help="attention kernel: sdpa (fused, default) or math (explicit matmul + softmax)")
    p.add_argument("--channels-last", action="store_true", help="NHWC convolutions in the UNet and VAE")
    p.add_argument("--compile", dest="compile_unet", action="store_true",
                   help="torch.compile the UNet in each engine actor (compiled once, at the first batch)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="times the driver re-runs unfinished rows after Ray aborts the dataset (lost node)")
    args = p.parse_args(argv)
    try:
        storage_options = json.loads(args.storage_options)
        args.engine_resources = json.loads(args.engine_resources)
    except json.JSONDecodeError as exc:
        p.error(f"--storage-options / --engine-resources is not JSON: {exc}")
    if args.gpus_per_actor is None:
        import torch

        args.gpus_per_actor = 1.0 if torch.cuda.is_available() else 0.0
    fields = {k: v for k, v in vars(args).items() if k in JobConfig.__dataclass_fields__}
    fields["storage_options"] = storage_options
    if args.smoke_test:
        fields["limit"] = 1
    return JobConfig(**fields)


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
