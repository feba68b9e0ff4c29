"""Errors as one line: what a user reads when a job, a task or a packing fails."""

from __future__ import annotations


def root_cause(exc: BaseException) -> str:
    """``Type: last line of the message`` of the innermost cause (Ray wraps a task's error in its own)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"[:500]
