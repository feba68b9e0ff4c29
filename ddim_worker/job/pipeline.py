"""The Ray Data pipeline of a job.

manifest row groups -> ``read_rows`` (CPU tasks: read, validate, sort by inversion) -> ``prepare_batch`` (CPU tasks:
fetch, decode, cache lookup) -> ``EditActor`` pool (the engine, loaded once per actor; GPUs) -> ``write_images`` (CPU
tasks: PNGs and latents) -> ``write_results`` (results shards; a summary per row back to the driver). Resources are
set here, where ``map_batches`` is called; the actor and the stages know nothing of them.
"""

from __future__ import annotations

import dataclasses

from ddim_worker.job.cluster import EnginePlan
from ddim_worker.job.config import JobConfig
from ddim_worker.job.source import SourceContext, read_rows
from ddim_worker.job.tasks import descriptor_dataset
from ddim_worker.job.stages import StageContext, prepare_batch, write_images, write_results

#: CPU slots the stages around the engine ask for, one task each: an engine actor never takes these.
OTHER_STAGES_CPUS = 2.0

#: Rows per shard when rows are recorded without the engine.
MAX_RECORD_ROWS = 8192


def build_dataset(config: JobConfig, source_ctx: SourceContext, ctx: StageContext, plan: EnginePlan, model: str,
                  scorer: str | None = None):
    """manifest row groups -> rows to do -> prepare -> engine actors -> images -> results shards (summaries out)."""
    import ray

    from ray.data import DataContext

    from ddim_worker.job.actor import EditActor

    context = DataContext.get_current()
    context.enable_progress_bars = True  # a dataset keeps the context it was made with: this one shows progress
    try:
        ds = descriptor_dataset(source_ctx.source.descriptors())
    finally:
        context.enable_progress_bars = False
    # One row group per task call: its rows (embedded images included) are read once, validated, sorted so that rows
    # sharing an inversion are neighbours, and cut into engine tasks whose calls fill (``task_packing``): blocks of
    # exactly ``rows_per_call`` rows, filler rows included.
    batch_size = plan.batch_size
    rows_per_call = batch_size * config.engine.calls_per_task
    source_ctx = dataclasses.replace(source_ctx, batch_size=batch_size, calls_per_task=config.engine.calls_per_task)
    ds = ds.map_batches(read_rows, fn_kwargs={"ctx": source_ctx}, batch_size=1, batch_format="numpy")
    # Blocks of one engine task: a read task's outputs are merged into one block, so without this the engine actor
    # would get a whole row group per call and hand nothing on until it had edited all of it (streaming, no shuffle).
    # The read stage's blocks hold whole tasks, so these blocks are its tasks.
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
                               "variant": config.variant, "scorer": scorer, "thresholds": config.thresholds(),
                               "keep_candidates": config.keep_candidates},
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


def _rows(source_ctx: SourceContext):
    """The rows ``source_ctx`` selects, as the read stage gives them, one per row: no engine tasks, no filler rows."""
    ds = descriptor_dataset(source_ctx.source.descriptors())
    unpacked = dataclasses.replace(source_ctx, batch_size=None)
    return ds.map_batches(read_rows, fn_kwargs={"ctx": unpacked}, batch_size=1, batch_format="numpy")


def record_rows(source_ctx: SourceContext, ctx: StageContext):
    """The rows ``source_ctx`` selects, straight into results shards (no engine): rows left when a job stops early."""
    return _rows(source_ctx).map_batches(write_results, fn_kwargs={"ctx": ctx}, batch_size=MAX_RECORD_ROWS,
                                         batch_format="numpy", num_cpus=0.25)


def count_rows_to_do(source_ctx: SourceContext) -> int:
    """How many rows the stream would take (to edit, or to record as failed): the read stage alone, CPU tasks, no
    engine actor. Asked only when every row already has an ok result, to confirm that none of their inputs changed."""
    return _rows(source_ctx).count()
