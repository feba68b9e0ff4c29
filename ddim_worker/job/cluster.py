"""The cluster a job runs on: starting Ray, and what the engine actors get there (how many, their GPUs, dtype and
batch size), decided from the resources the cluster has, never written into the configuration."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from ddim_worker import failpoints
from ddim_worker.job.config import JobConfig
from ddim_worker.core.settings import DEFAULT_BATCH_SIZE

log = logging.getLogger("ddim_edit.job")

#: Logical CPUs a local Ray instance gets beyond the machine's cores (see ``init_ray``).
LOCAL_EXTRA_CPUS = 2

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
        extra: dict = {"num_cpus": (os.cpu_count() or 1) + LOCAL_EXTRA_CPUS} if address == "local" else {}
        # Failpoints asked of this driver reach the workers of a cluster it joins (a local instance's workers
        # inherit the driver's environment anyway).
        asked = {k: os.environ[k] for k in (failpoints.ENV, failpoints.DIR_ENV) if os.environ.get(k)}
        if asked and address != "local":
            extra["runtime_env"] = {"env_vars": asked}
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
    from ddim_worker.core.models import dtype_name_without_cuda

    return dtype_name_without_cuda(config.engine.dtype)


@dataclass(frozen=True)
class EngineDevice:
    """What an engine GPU says about itself: free memory and the dtype ``--dtype`` resolves to there."""

    free_bytes: int | None
    dtype: str


def _describe_device(dtype: str) -> EngineDevice:
    from ddim_worker.core import fastpath
    from ddim_worker.core.models import choose_device, choose_dtype

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
    """``--batch-size``, else on a GPU from its free memory, else the device's default. Without ``--batch-size`` a
    CPU call holds at least a row's candidates and their source branch (``--candidates K``: K + 1 branches), so the
    source branch is sampled once per image, not once per call a row's candidates would be cut into."""
    if config.engine.batch_size:
        return config.engine.batch_size
    if gpus_per_actor <= 0:
        return max(DEFAULT_BATCH_SIZE["cpu"], config.edit.candidates + 1 if config.edit.candidates > 1 else 0)
    import torch

    from ddim_worker.core import fastpath

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
