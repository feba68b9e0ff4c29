"""Failpoints: a worker process kills itself at a named point of the job, so tests can reproduce a crash exactly where
a cluster's faults land (the OOM killer after a write, before the task returns). Off unless the environment asks.

    DDIM_EDIT_FAILPOINTS="results_written=3"   SIGKILL the first 3 processes that reach failpoint("results_written")
    DDIM_EDIT_FAILPOINTS_DIR=/some/dir          where the processes count (one file per kill), shared by all of them

The points: ``results_written`` (a results shard is written, its task has not returned), ``image_written`` (an
edited PNG is written, its batch's other rows and its results not yet), ``engine_batch_done`` (an engine actor
has edited a batch and not yet handed it on) and ``compaction_written`` (the driver's compaction has written its
new shards and deleted none of the old ones).
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

ENV, DIR_ENV = "DDIM_EDIT_FAILPOINTS", "DDIM_EDIT_FAILPOINTS_DIR"


def _budget(name: str) -> int:
    for part in os.environ.get(ENV, "").split(","):
        point, _, count = part.strip().partition("=")
        if point == name:
            return int(count or 1)
    return 0


def failpoint(name: str) -> None:
    """Kill this process (SIGKILL, no cleanup) if ``name`` still has kills left; otherwise do nothing."""
    budget = _budget(name) if ENV in os.environ else 0
    if budget <= 0:
        return
    folder = Path(os.environ.get(DIR_ENV) or tempfile.gettempdir()) / "ddim-edit-failpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(budget):
        try:
            os.close(os.open(folder / f"{name}-{k}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)
