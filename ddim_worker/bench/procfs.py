"""What the benchmarks read about processes and the machine from Linux's ``/proc``: memory, children, load.

One home for these readers: the scale, pack and control-memory benchmarks sample memory the same way, and every
benchmark records the load average beside its figures (timings on shared cores mean little without it).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Bytes in a megabyte, as the benchmarks report memory (MB, not MiB).
MB = 1e6

#: The ``/proc/<pid>/status`` fields :func:`read_status` returns by default.
MEMORY_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def read_status(pid: int | str = "self", fields: tuple[str, ...] = MEMORY_FIELDS) -> dict[str, int]:
    """``fields`` of ``/proc/<pid>/status`` (kB values) in bytes; empty once the process has exited."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in fields:
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        return {}
    return out


def has_children(pid: int) -> bool:
    """Whether ``pid`` has started a child process (a driver's ``ray.init`` starts the GCS and raylet)."""
    try:
        return any(Path(task, "children").read_text().strip() for task in Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, rounded; None where the system has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None
