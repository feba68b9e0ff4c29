"""The process environment the test services and Ray workers need; ``prepare_environment`` is idempotent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def prepare_environment() -> None:
    """Set what must be in ``os.environ`` before Ray or any client starts (a second call changes nothing).

    Ray must not wrap workers in `uv run`, phone home, or reach the network; workers must import the package from
    the checkout (``PYTHONPATH``). Set before Ray starts so the raylet and every worker process inherit it.
    Loopback only: a proxy from the environment must never see test traffic (``NO_PROXY``/``no_proxy``).
    ``python`` on ``PATH`` is this interpreter (the checkout's virtual environment, where ``make test`` runs it
    without activating it): a job submitted to the session's Ray runs its entrypoint's ``python`` from Ray's PATH.
    """
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DISABLE_DOCKER_CPU_WARNING", "1")
    # `datasets` loads the packed datasets from local folders: it must not look for them on the Hub first.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    for var in ("NO_PROXY", "no_proxy"):
        have = [x for x in os.environ.get(var, "").split(",") if x]
        os.environ[var] = ",".join(dict.fromkeys([*have, "127.0.0.1", "localhost", "::1"]))
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([pp] if pp else [])])
    bin_dir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if path[:1] != [bin_dir]:
        os.environ["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p and p != bin_dir)])
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
