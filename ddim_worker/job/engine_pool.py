"""The Ray side of a job: starting Ray, deciding the engine actors' hardware, and the Ray Data pipeline.

manifest row groups -> ``read_rows`` (CPU tasks: read, validate, sort by inversion) -> ``prepare_batch`` (CPU tasks:
fetch, decode, cache lookup) -> ``EditActor`` pool (the engine, loaded once per actor; GPUs) -> ``write_images`` (CPU
tasks: PNGs and latents) -> ``write_results`` (results shards; a summary per row back to the driver). Resources are
set here, where ``map_batches`` is called; the actor and the stages know nothing of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ddim_worker.job.config import JobConfig
from ddim_worker.job.source import SourceContext, index_groups, read_rows
from ddim_worker.settings import DEFAULT_BATCH_SIZE
from ddim_worker.stages import StageContext, prepare_batch, write_images, write_results

log = logging.getLogger("ddim_edit.job")

#: CPU slots the stages around the engine ask for, one task each: an engine actor never takes these.
OTHER_STAGES_CPUS = 2.0

#: Logical CPUs a local Ray instance gets beyond the machine's cores (see ``init_ray``).
LOCAL_EXTRA_CPUS = 2

#: Blocks of row-group descriptors, at most: enough for every core of a large cluster to read at once.
MAX_READ_BLOCKS = 4096

#: Rows per shard when rows are recorded without the engine.
MAX_RECORD_ROWS = 8192

#: Times an engine actor retries loading the model in its own process before it gives up and dies.
ACTOR_INIT_RETRIES = 1

#: Consecutive engine actor deaths during start-up the pool tolerates, per actor of the pool, before it fails the
#: attempt (the count starts again whenever an actor starts). The driver then starts a new attempt if this one made
#: progress (some actor works), and stops the job if it did not (no actor can load the model).
ACTOR_INIT_DEATHS_PER_ACTOR = 2

#: How long the driver waits for an engine GPU to say what it is before going on with defaults (an autoscaler may
#: still be adding the GPU node).
PROBE_TIMEOUT_S = 60.0

#: Seconds between Ray Data's progress lines in a job's log (its operators: tasks, actors, rows, queued blocks).
PROGRESS_LOG_S = 30


def init_ray(config: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # No address: a new local instance ("local"), never a stale cluster recorded in /tmp/ray by `ray start`.
        address = config.address or os.environ.get("RAY_ADDRESS") or "local"
        # A local instance gets a few logical CPUs more than the machine has: the I/O-bound stages (reading, fetching,
        # writing) hold CPU slots while they wait, and on a 2-core machine the stream would otherwise stall with the
        # reading task and the engine actor holding every slot.
        extra = {"num_cpus": (os.cpu_count() or 1) + LOCAL_EXTRA_CPUS} if address == "local" else {}
        # Workers' warnings (fetch retries, unreadable cache entries, engine fallbacks) reach `ray job logs`.
        ray.init(address=address, log_to_driver=True, **extra)
    # Ray Data's operator progress, for people watching a job's log (is the GPU starved? which stage lags?): a
    # few lines every PROGRESS_LOG_S when the log is not a terminal (`ray job logs`, files), bars on a terminal.
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(PROGRESS_LOG_S))
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # on for the main stream only (``quiet`` passes would flood the log)
    context.execution_options.preserve_order = False
    # An engine actor that cannot load the model (a node with a full disk, a flaky store) tries again in-process,
    # then dies and is replaced, while the other actors go on; only a pool where no actor ever starts fails.
    context.actor_init_retry_on_errors = True
    context.actor_init_max_retries = ACTOR_INIT_RETRIES


def cluster_gpus_per_actor(config: JobConfig) -> float:
    """``--gpus-per-actor``, or its default: 1 when the Ray cluster has GPUs (on any node), else 0.

    Decided from the cluster's resources, not the driver's torch: the usual cluster is a CPU head with GPU workers.
    """
    if config.gpus_per_actor is not None:
        return float(config.gpus_per_actor)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def cluster_actors(config: JobConfig, gpus_per_actor: float) -> tuple[int, int | None]:
    """(actors to start, most actors) without ``--actors``: on a GPU cluster every GPU it has now (GPUs /
    ``--gpus-per-actor``), and the pool grows when GPU nodes join (no upper bound) and shrinks when they go; on a
    CPU-only cluster one actor per node that can hold one (its cores are shared with the fetch and write stages, so
    more would starve them). ``--actors N`` is a fixed upper bound: 1..N."""
    if config.actors is not None:
        return config.actors, config.actors
    import ray

    if gpus_per_actor > 0:
        return max(1, int(ray.cluster_resources().get("GPU", 0) // gpus_per_actor)), None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [n for n in nodes if all(n.get("Resources", {}).get(name, 0) >= amount
                                    for name, amount in (config.engine_resources or {}).items())]
    return max(1, len(fits)), max(1, len(fits))


@dataclass(frozen=True)
class EnginePlan:
    """What the driver decided from the cluster it found: runtime facts, never written into the configuration (a
    rerun from ``job.json`` decides again on the cluster it finds)."""

    actors: int  # engine actors started
    max_actors: int | None  # None: the pool grows with the cluster
    gpus_per_actor: float
    batch_size: int
    dtype: str

    @property
    def device(self) -> str:
        return "cuda" if self.gpus_per_actor > 0 else "cpu"


def plan_engine(config: JobConfig) -> EnginePlan:
    """GPUs per actor, actors, dtype and batch size, from the cluster (a probe task on an engine GPU for the last
    two)."""
    gpus = cluster_gpus_per_actor(config)
    actors, max_actors = cluster_actors(config, gpus)
    device = probe_engine_device(config, gpus) if gpus > 0 else None
    dtype = device.dtype if device else _cpu_dtype(config)
    plan = EnginePlan(actors, max_actors, gpus, batch_size_for(config, gpus, device), dtype)
    from ray.data import DataContext

    DataContext.get_current().max_consecutive_actor_init_deaths = ACTOR_INIT_DEATHS_PER_ACTOR * max(actors, 1)
    log.info("engine: %d actor(s)%s, %g GPU(s) each, batch %d, %s", actors,
             " (growing with the cluster)" if max_actors is None else "", gpus, plan.batch_size, dtype)
    return plan


def _cpu_dtype(config: JobConfig) -> str:
    import torch

    from ddim_worker.models import choose_dtype

    return str(choose_dtype(config.engine.dtype, torch.device("cpu"))).removeprefix("torch.")


@dataclass(frozen=True)
class EngineDevice:
    """What an engine GPU says about itself: free memory and the dtype ``--dtype`` resolves to there."""

    free_bytes: int | None
    dtype: str


def _describe_device(dtype: str) -> EngineDevice:
    from ddim_worker import fastpath
    from ddim_worker.models import choose_device, choose_dtype

    device = choose_device("auto")
    resolved = str(choose_dtype(dtype, device)).removeprefix("torch.")
    return EngineDevice(fastpath.free_device_bytes(device) if device.type == "cuda" else None, resolved)


def probe_engine_device(config: JobConfig, gpus_per_actor: float,
                        timeout_s: float = PROBE_TIMEOUT_S) -> EngineDevice | None:
    """Ask a Ray task with the engine actors' resources what its device is; None when none answers in time."""
    import ray

    probe = ray.remote(_describe_device).options(num_gpus=gpus_per_actor or None, num_cpus=0,
                                                 resources=config.engine_resources or None)
    ref = probe.remote(config.engine.dtype)
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a hint only; the job goes on with defaults
        ray.cancel(ref, force=True)
        log.warning("no engine worker said what device it has (%s); using defaults", type(exc).__name__)
        return None


def batch_size_for(config: JobConfig, gpus_per_actor: float, device: EngineDevice | None) -> int:
    """``--batch-size``, else on a GPU from its free memory, else the device's default."""
    if config.engine.batch_size:
        return config.engine.batch_size
    if gpus_per_actor <= 0:
        return DEFAULT_BATCH_SIZE["cpu"]
    import torch

    from ddim_worker import fastpath

    if device is None or not device.free_bytes:
        log.warning("the engine GPU reported no free memory (no CUDA in the worker?); batch size %d",
                    DEFAULT_BATCH_SIZE["cuda"])
        return DEFAULT_BATCH_SIZE["cuda"]
    edit = config.edit  # rows under attention control size their calls with its measured bytes per row
    batch = fastpath.batch_size_before_load(device.free_bytes, config.engine.size, getattr(torch, device.dtype),
                                            control=edit.cross_replace > 0 or edit.self_replace > 0)
    log.info("batch size %d from %.1f GiB free on an engine GPU (%s, %d px)", batch, device.free_bytes / 2**30,
             device.dtype, config.engine.size)
    return batch


def build_dataset(config: JobConfig, source_ctx: SourceContext, ctx: StageContext, plan: EnginePlan, model: str):
    """manifest row groups -> rows to do -> prepare -> engine actors -> images -> results shards (summaries out)."""
    import ray

    from ray.data import DataContext

    from ddim_worker.actor import EditActor

    groups = source_ctx.source.descriptors()
    context = DataContext.get_current()
    context.enable_progress_bars = True  # a dataset keeps the context it was made with: this one shows progress
    try:
        ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), MAX_READ_BLOCKS)))
    finally:
        context.enable_progress_bars = False
    # One row group per task call: its rows (embedded images included) are read once, validated, sorted so that rows
    # sharing an inversion are neighbours.
    ds = ds.map_batches(read_rows, fn_kwargs={"ctx": source_ctx}, batch_size=1, batch_format="numpy")
    # Blocks of one engine batch: a task's outputs are merged into one block, so without this the engine actor would
    # get a whole row group per call and hand nothing on until it had edited all of it (streaming, no shuffle).
    batch_size = plan.batch_size
    rows_per_call = batch_size * config.engine.calls_per_task
    ds = ds.repartition(target_num_rows_per_block=rows_per_call)
    # Fetching is I/O-bound: half a CPU per task lets two run per core. It also keeps the stage apart from the engine
    # actors (Ray Data fuses stages with equal resources), so engine actors never wait on the network.
    ds = ds.map_batches(prepare_batch, fn_kwargs={"ctx": ctx}, batch_size=rows_per_call, batch_format="numpy",
                        num_cpus=0.5)
    engine_cpus = 1 if plan.device == "cuda" else config.cpus_per_actor
    # The actor runs torch on `engine_cpus` threads but leaves the CPU slots the other stages need to run at all
    # (reading 1, fetching 0.5, writing 0.25 + 0.2): on a small CPU-only node the stream would otherwise stall.
    cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
    engine_cpu_slots = min(float(engine_cpus), max(cluster_cpus - OTHER_STAGES_CPUS, 0.25))
    ds = ds.map_batches(
        EditActor,
        # Elastic between 1 and --actors: a job goes on when a node with an actor is lost and cannot be replaced.
        # Ray Data restarts dead engine actors and retries their tasks (max_restarts=-1, max_task_retries=-1).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=plan.max_actors, initial_size=plan.actors),
        fn_constructor_kwargs={"model": model, "engine": config.engine, "batch_size": batch_size,
                               "device": "auto", "storage_options": config.storage_options,
                               "num_threads": max(int(engine_cpus), 1),
                               "measure_fidelity": config.measure_fidelity, "revision": config.revision,
                               "cache_latents": ctx.layout.caches_latents, "schema": ctx.schema,
                               "variant": config.variant},
        batch_size=rows_per_call,
        batch_format="numpy",
        num_gpus=plan.gpus_per_actor or None,
        num_cpus=engine_cpu_slots,
        resources=config.engine_resources or None,
    )
    # PNG encoding and writes are light: a quarter CPU, so every stage fits on a small node at once (a stage that
    # cannot be scheduled while the others hold their CPUs would stall the stream).
    ds = ds.map_batches(write_images, fn_kwargs={"ctx": ctx}, batch_size=rows_per_call, batch_format="numpy",
                        num_cpus=0.25)
    # Results shards of up to --results-shard-rows rows (the last one smaller). A stage of its own (other resources,
    # so Ray Data does not fuse it with the PNG writes, which are never held back until a shard is full).
    return ds.map_batches(write_results, fn_kwargs={"ctx": ctx}, batch_size=config.results_shard_rows,
                          batch_format="numpy", num_cpus=0.2)


def record_rows(source_ctx: SourceContext, ctx: StageContext):
    """The rows ``source_ctx`` selects, straight into results shards (no engine): rows left when a job stops early."""
    import ray

    groups = source_ctx.source.descriptors()
    ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), MAX_READ_BLOCKS)))
    ds = ds.map_batches(read_rows, fn_kwargs={"ctx": source_ctx}, batch_size=1, batch_format="numpy")
    return ds.map_batches(write_results, fn_kwargs={"ctx": ctx}, batch_size=MAX_RECORD_ROWS, batch_format="numpy",
                          num_cpus=0.25)


def index_manifest(source_ctx: SourceContext) -> tuple[np.ndarray, np.ndarray]:
    """(manifest rows, id hashes) of the whole manifest, computed by Ray tasks; 16 bytes a row in the driver."""
    import ray

    source = source_ctx.source
    rows = np.zeros(source.total_rows, np.int64)
    hashes = np.zeros(source.total_rows, np.uint64)
    groups = source.descriptors()
    ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), MAX_READ_BLOCKS)))
    ds = ds.map_batches(index_groups, fn_kwargs={"ctx": source_ctx}, batch_size=1, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        where = batch["manifest_row"]
        rows[where], hashes[where] = where, batch["id_hash"]
    return rows, hashes


def ids_of_rows(source_ctx: SourceContext, rows: list[int]) -> dict[int, str | None]:
    """The full ids of a few manifest rows (the first rows of repeated id hashes), read by Ray tasks."""
    import ray

    wanted = np.array(sorted(rows), np.int64)
    groups = [g for g in source_ctx.source.descriptors()
              if ((wanted >= g["first_row"]) & (wanted < g["first_row"] + g["rows"])).any()]
    ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), MAX_READ_BLOCKS)))
    ds = ds.map_batches(_ids_of_rows, fn_kwargs={"ctx": source_ctx, "wanted": wanted}, batch_size=1,
                        batch_format="numpy")
    out: dict[int, str | None] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out.update({int(r): (str(i) if i else None) for r, i in zip(batch["manifest_row"], batch["id"])})
    return out


def _ids_of_rows(batch: dict[str, np.ndarray], ctx: SourceContext, wanted: np.ndarray) -> dict[str, np.ndarray]:
    from ddim_worker.job.source import _groups, parse_rows, read_group

    rows, ids = [], []
    for group in _groups(batch):
        for row in parse_rows(ctx.source, read_group(ctx.source, group), group.first_row, ctx.defaults,
                              ctx.max_prompt_chars):
            if row.manifest_row in wanted:
                rows.append(row.manifest_row)
                ids.append(row.id or "")
    return {"manifest_row": np.array(rows, np.int64), "id": np.array(ids, dtype=object)}


def failed_manifest_rows(source_ctx: SourceContext, failed: np.ndarray):
    """The manifest's own rows (its columns, untouched) whose bit is set in ``failed``, as pyarrow batches."""
    import ray

    groups = [g for g in source_ctx.source.descriptors()
              if failed[g["first_row"]:g["first_row"] + g["rows"]].any()]
    if not groups:
        return
    ref = ray.put(failed)
    ds = ray.data.from_items(groups, override_num_blocks=max(1, min(len(groups), MAX_READ_BLOCKS)))
    ds = ds.map_batches(_failed_rows, fn_kwargs={"source": source_ctx.source, "failed": ref}, batch_size=1,
                        batch_format="pyarrow")
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _failed_rows(batch: Any, source: Any, failed: Any) -> Any:
    import ray

    from ddim_worker.job.source import RowGroup, read_group

    failed = ray.get(failed) if type(failed).__name__ == "ObjectRef" else failed
    tables = []
    for g in batch.to_pylist():
        group = RowGroup(int(g["file"]), int(g["group"]), int(g["first_row"]), int(g["rows"]))
        table = read_group(source, group)
        tables.append(table.filter(pa.array(failed[group.first_row:group.first_row + group.rows])))
    return pa.concat_tables(tables)
