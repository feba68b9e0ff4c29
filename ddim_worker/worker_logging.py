"""Logging in Ray workers: warnings to stderr (which Ray forwards to the driver and ``ray job logs``), throttled."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

log = logging.getLogger("ddim_worker.fetch")


# ---------------------------------------------------------------- worker logging


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time (pytest and Ray swap it), never to a stale stream."""

    _ddim_edit_worker_handler = True

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


_logging_lock = threading.Lock()
_logging_pid: int | None = None


def ensure_worker_logging(level: int | str | None = None) -> None:
    """Send this package's log records (``ddim_worker.*``, WARNING and up by default) to stderr, once per process.

    Ray writes a worker's stderr to its log files and, when the driver called ``ray.init(log_to_driver=True)``,
    forwards it to the driver, whose output is what ``ray job logs`` shows. ``DDIM_EDIT_LOG_LEVEL=INFO`` in the
    workers' environment also shows retries. Calling it again (every batch) does nothing.
    """
    global _logging_pid
    if _logging_pid == os.getpid():
        return
    with _logging_lock:
        if _logging_pid == os.getpid():
            return
        logger = logging.getLogger("ddim_worker")
        level = level or os.environ.get("DDIM_EDIT_LOG_LEVEL") or logging.WARNING
        if isinstance(level, str):
            level = logging.getLevelName(level.upper())
            level = level if isinstance(level, int) else logging.WARNING
        if not any(getattr(h, "_ddim_edit_worker_handler", False) for h in logger.handlers):
            handler = _StderrHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handler.setLevel(level)
            logger.addHandler(handler)
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)
        _logging_pid = os.getpid()


_warned: dict[str, float] = {}
_warned_lock = threading.Lock()


def _warn_once_a_minute(key: str, message: str, *args) -> None:
    """A warning per ``key`` at most once a minute per process: a throttling host must not flood the job log."""
    now = time.monotonic()
    with _warned_lock:
        if now - _warned.get(key, -1e9) < 60:
            return
        _warned[key] = now
    log.warning(message, *args)

