"""One local Ray instance (4 logical CPUs, 512 MiB object store), started and stopped by ``local_ray``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tests.support.env import prepare_environment

#: ``ray.init`` arguments of the test session's instance.
RAY_INIT_KWARGS: dict[str, Any] = dict(
    address="local",  # a new instance, never a cluster a `ray start` recorded in /tmp/ray
    num_cpus=4,
    num_gpus=0,
    object_store_memory=512 * 2**20,
    include_dashboard=True,  # the state API (ray.util.state) the fault tests use goes through it
    ignore_reinit_error=True,
    log_to_driver=True,
    configure_logging=True,
    logging_level="WARNING",
    # Every worker imports the engine actor's and the stages' modules (torch, diffusers) as it starts, before it
    # takes work. Measured on 4-row jobs in this session's set-up (two runs of three jobs each): 8.0-9.2 s a job with
    # these preloaded, 8.5-10.6 s with only the stages' (torch-free) modules; an engine actor gets a fresh worker
    # process either way.
    _system_config={"preload_python_modules": ["ddim_worker.job.actor", "ddim_worker.job.stages",
                                               "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion"]},
)


@contextlib.contextmanager
def local_ray() -> Iterator[Any]:
    """Start a local Ray instance, yield the ``RayContext`` from ``ray.init``, shut it down on exit.

    If Ray is already initialised in this process, yield its runtime context and leave it running (someone else
    owns it). Worker stdout/stderr is forwarded to the driver. Workers inherit the environment at start (see
    ``prepare_environment``), so pass S3 credentials as explicit ``storage_options`` rather than through env vars.
    """
    import ray

    prepare_environment()
    if ray.is_initialized():  # pragma: no cover - someone else started it; share, do not stop it
        yield ray.get_runtime_context()
        return
    ctx = ray.init(**RAY_INIT_KWARGS)
    try:
        yield ctx
    finally:
        ray.shutdown()
