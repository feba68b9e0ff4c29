"""What every worker of the test session's Ray imports as it starts (Ray's ``preload_python_modules``).

Every worker imports the stages' modules (torch-free: reading, fetching, writing). A worker of the session's own job
(pytest's in-process jobs) that is still idle ``IDLE_S`` after it started also imports the engine actor's modules
(torch, diffusers, transformers: about 5 s of CPU here), in a thread: those are the workers ``FreshWorkers`` keeps
ready for the next in-process job's engine actor, which then skips that import on its critical path. A worker Ray
started for a task gets it at once and imports nothing heavy (a job's read, fetch and write tasks would only pay for
it: on 2 cores, a job of 10,000 rows spent half its time importing torch into task workers). Workers started for
another driver's job (the subprocess drivers that join this Ray) import nothing heavy either: that job's engine actor
imports what it needs.
"""

from __future__ import annotations

import os
import threading
import time

import ddim_worker.job.stages  # noqa: F401

#: The job id of the first driver that connects to a new Ray instance: the test session's, which starts it.
SESSION_JOB_ID = "01000000"
#: How long a new worker must stay idle (no task, no actor) before it counts as one kept for an engine actor.
IDLE_S = 2.0


def _title() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as handle:
            return handle.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


def _import_engine_when_idle() -> None:
    deadline = time.monotonic() + IDLE_S
    while time.monotonic() < deadline:
        if _title() not in ("ray::IDLE", ""):  # given a task or an actor: not a worker kept idle
            return
        time.sleep(0.05)
    import ddim_worker.core.engine  # noqa: F401
    import ddim_worker.core.fastpath  # noqa: F401
    import ddim_worker.core.trajectory_codec  # noqa: F401
    import ddim_worker.job.actor  # noqa: F401
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: F401


if os.environ.get("RAY_JOB_ID") == SESSION_JOB_ID:
    threading.Thread(target=_import_engine_when_idle, name="engine-preload", daemon=True).start()
