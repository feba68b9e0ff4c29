"""The Ray side of a job: starting Ray, deciding the engine actors' hardware, and the Ray Data pipeline.

manifest rows -> ``prepare_batch`` (CPU tasks: fetch, decode, cache lookup) -> ``EditActor`` pool (the engine, loaded
once per actor; GPUs) -> ``write_batch`` (CPU tasks: PNGs and latents). Resources are set here, where ``map_batches``
is called; the actor and the stages know nothing of them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import pyarrow as pa

from ddim_worker.job.config import JobConfig
from ddim_worker.settings import DEFAULT_BATCH_SIZE
from ddim_worker.stages import StageContext, prepare_batch, write_batch

log = logging.getLogger("ddim_edit.job")

#: How long the driver waits for an engine GPU to say what it is before going on with defaults (an autoscaler may
#: still be adding the GPU node).
PROBE_TIMEOUT_S = 60.0


def init_ray(config: JobConfig) -> None:
    import ray

    if not ray.is_initialized():
        # No address: a new local instance ("local"), never a stale cluster recorded in /tmp/ray by `ray start`.
        address = config.address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, log_to_driver=False)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the driver prints its own progress line
    context.execution_options.preserve_order = False


def cluster_gpus_per_actor(config: JobConfig) -> float:
    """``--gpus-per-actor``, or its default: 1 when the Ray cluster has GPUs (on any node), else 0.

    Decided from the cluster's resources, not the driver's torch: the usual cluster is a CPU head with GPU workers.
    """
    if config.gpus_per_actor is not None:
        return float(config.gpus_per_actor)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


@dataclass(frozen=True)
class EngineDevice:
    """What an engine GPU says about itself: free memory and the dtype ``--dtype`` resolves to there."""

    free_bytes: int | None
    dtype: str


def _describe_device(dtype: str) -> EngineDevice:
    import torch

    from ddim_worker import fastpath
    from ddim_worker.models import choose_device, choose_dtype

    device = choose_device("auto")
    resolved = str(choose_dtype(dtype, device)).removeprefix("torch.")
    return EngineDevice(fastpath.free_device_bytes(device) if device.type == "cuda" else None, resolved)


def probe_engine_device(config: JobConfig, timeout_s: float = PROBE_TIMEOUT_S) -> EngineDevice | None:
    """Ask a Ray task with the engine actors' resources what its device is; None when none answers in time."""
    import ray

    probe = ray.remote(_describe_device).options(num_gpus=config.gpus_per_actor or None, num_cpus=0,
                                                 resources=config.engine_resources or None)
    ref = probe.remote(config.engine.dtype)
    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a hint only; the job goes on with defaults
        ray.cancel(ref, force=True)
        log.warning("no engine worker said what device it has (%s); using defaults", type(exc).__name__)
        return None


def batch_size_for(config: JobConfig, device: EngineDevice | None) -> int:
    """``--batch-size``, else on a GPU from its free memory, else the device's default."""
    if config.engine.batch_size:
        return config.engine.batch_size
    if config.device != "cuda":
        return DEFAULT_BATCH_SIZE["cpu"]
    import torch

    from ddim_worker import fastpath

    if device is None or not device.free_bytes:
        log.warning("the engine GPU reported no free memory (no CUDA in the worker?); batch size %d",
                    DEFAULT_BATCH_SIZE["cuda"])
        return DEFAULT_BATCH_SIZE["cuda"]
    batch = fastpath.batch_size_before_load(device.free_bytes, config.engine.size, getattr(torch, device.dtype))
    log.info("batch size %d from %.1f GiB free on an engine GPU (%s, %d px)", batch, device.free_bytes / 2**30,
             device.dtype, config.engine.size)
    return batch


def build_dataset(config: JobConfig, rows: list[dict], ctx: StageContext, batch_size: int, model: str):
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
    engine_cpus = 1 if config.device == "cuda" else config.cpus_per_actor
    ds = ds.map_batches(
        EditActor,
        # Elastic between 1 and --actors: a job goes on when a node with an actor is lost and cannot be replaced.
        # Ray Data restarts dead engine actors and retries their tasks (max_restarts=-1, max_task_retries=-1).
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.actors, initial_size=config.actors),
        fn_constructor_kwargs={"model": model, "engine": config.engine, "batch_size": batch_size,
                               "device": config.device, "storage_options": config.storage_options,
                               "num_threads": max(int(engine_cpus), 1),
                               "measure_fidelity": config.measure_fidelity, "revision": config.revision,
                               "variant": config.variant},
        batch_size=batch_size,
        batch_format="numpy",
        num_gpus=config.gpus_per_actor or None,
        num_cpus=engine_cpus,
        resources=config.engine_resources or None,
    )
    return ds.map_batches(write_batch, fn_kwargs={"ctx": ctx}, batch_size=batch_size, batch_format="numpy",
                          num_cpus=1)
