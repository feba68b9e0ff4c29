"""What every worker of the test session's Ray imports as it starts (Ray's ``preload_python_modules``).

Every worker imports the stages' modules (torch-free: reading, fetching, writing). Only workers started for the
session's own driver (pytest: the first job on this Ray) also import the engine actor's (torch, diffusers,
transformers; about 5 s of CPU here): those are the workers ``FreshWorkers`` keeps ready for the in-process jobs'
engine actors. Workers started for another driver's job (the subprocess drivers that join this Ray) run that job's
read and write tasks: the heavy imports would only slow them, and that job's engine actor imports what it needs.
"""

from __future__ import annotations

import os

import ddim_worker.job.stages  # noqa: F401

#: The job id of the first driver that connects to a new Ray instance: the test session's, which starts it.
SESSION_JOB_ID = "01000000"

if os.environ.get("RAY_JOB_ID") == SESSION_JOB_ID:
    import ddim_worker.core.engine  # noqa: F401
    import ddim_worker.core.fastpath  # noqa: F401
    import ddim_worker.core.trajectory_codec  # noqa: F401
    import ddim_worker.job.actor  # noqa: F401
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion  # noqa: F401
