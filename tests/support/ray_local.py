"""One local Ray instance (2 logical CPUs, 512 MiB object store), started and stopped by ``local_ray``."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from tests.support.env import prepare_environment

#: ``ray.init`` arguments of the test session's instance.
RAY_INIT_KWARGS: dict[str, Any] = dict(
    address="local",  # a new instance, never a cluster a `ray start` recorded in /tmp/ray
    # This machine's cores: a job's stages run fewer tasks at once than with more logical CPUs, so fewer worker
    # processes start (each costs seconds of CPU to import what its tasks need: the suite is CPU-bound); it is also
    # the 2-CPU node that test_a_two_cpu_node_does_not_stall needs.
    num_cpus=2,
    num_gpus=0,
    object_store_memory=512 * 2**20,
    include_dashboard=True,  # the state API (ray.util.state) the fault tests use goes through it
    ignore_reinit_error=True,
    log_to_driver=True,
    configure_logging=True,
    logging_level="WARNING",
    # What each worker imports as it starts: tests.support.worker_preload (the engine's modules only in a worker of
    # the session's own job still idle two seconds after it started: one FreshWorkers keeps for an engine actor).
    _system_config={"preload_python_modules": ["tests.support.worker_preload"]},
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



class FreshWorkers:
    """Keeps ``target`` worker processes that have never run anything idle on this driver's raylet.

    Why: Ray gives a new actor an idle worker that has never run a task when it has one, and starts a process
    otherwise (with the engine's imports, about 5 s on 2 cores); every job's engine actor is a new actor, so each job in
    the suite paid that start on its critical path. A thread polls the raylet's children every quarter second, counts
    a worker as used once it is seen under another name than ``ray::IDLE``, and asks the raylet for more
    (``prestart_workers``) while fewer than ``target`` fresh ones are idle or starting. A task shorter than the poll
    can go unseen; that worker then counts as fresh, and the next actor may start its own process: slower, not wrong.
    Drivers in other processes (another job) cannot use these workers.
    """

    def __init__(self, target: int = 2, poll_s: float = 0.25, start_timeout_s: float = 30.0) -> None:
        self.target, self.poll_s, self.start_timeout_s = target, poll_s, start_timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fresh-ray-workers", daemon=True)

    def __enter__(self) -> FreshWorkers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        import psutil

        try:
            raylet = psutil.Process(_raylet_pid())
        except Exception:  # noqa: BLE001 - best effort: without it the suite is only slower
            return
        used: set[int] = set()
        known: set[int] = set()
        asked: list[float] = []  # when each prestarted worker still to appear was asked for
        while not self._stop.wait(self.poll_s):
            try:
                children = raylet.children()
            except psutil.Error:
                return
            idle = set()
            for child in children:
                try:
                    cmdline = child.cmdline()
                except psutil.Error:
                    continue
                if not cmdline or not cmdline[0].startswith("ray::"):
                    continue
                if child.pid not in known:
                    known.add(child.pid)
                    if asked:
                        asked.pop(0)
                if cmdline[0] == "ray::IDLE" and child.pid not in used:
                    idle.add(child.pid)
                else:
                    used.add(child.pid)
            now = time.monotonic()
            asked = [t for t in asked if now - t < self.start_timeout_s]
            missing = self.target - len(idle) - len(asked)
            if missing > 0:
                try:
                    prestart_workers(missing)
                except Exception:  # noqa: BLE001
                    return
                asked += [now] * missing


def _raylet_pid() -> int:
    from ray._private import ray_constants
    from ray._private.worker import _global_node

    return _global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def prestart_workers(count: int, keep_alive_s: int = 600) -> None:
    """Ask the local raylet to start ``count`` worker processes for this driver's job now, kept ``keep_alive_s``
    (for ``FreshWorkers``). Ray's own drivers reach this raylet call (``PrestartWorkers``) only from C++, so it is
    made here with Ray's generated gRPC stub and channel helper."""
    import ray
    from ray._private.grpc_utils import init_grpc_channel
    from ray.core.generated import common_pb2, node_manager_pb2, node_manager_pb2_grpc, runtime_environment_pb2

    node = next(n for n in ray.nodes() if n["Alive"])
    channel = init_grpc_channel(f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}")
    try:
        node_manager_pb2_grpc.NodeManagerServiceStub(channel).PrestartWorkers(
            node_manager_pb2.PrestartWorkersRequest(
                language=common_pb2.PYTHON, job_id=bytes.fromhex(ray.get_runtime_context().get_job_id()),
                runtime_env_info=runtime_environment_pb2.RuntimeEnvInfo(serialized_runtime_env="{}"),
                keep_alive_duration_secs=keep_alive_s, num_workers=count),
            timeout=10)
    finally:
        channel.close()
