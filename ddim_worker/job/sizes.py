"""Sizes as ``datasets`` spells them (``500MB``, ``100KB``, ``2GB``, ``512MiB``): the packed dataset's file size."""

from __future__ import annotations

import re
from typing import Any

#: ``--max-shard-size``'s default: what ``datasets``' ``push_to_hub`` writes.
DEFAULT_MAX_SHARD_SIZE = "500MB"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: Any) -> int:
    """Bytes from ``100KB``, ``500MB``, ``2GB`` (powers of 10, as ``datasets``), ``512MiB`` (powers of 2) or a number."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, (int, float)) and value > 0:
        return int(value)
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (write e.g. 100KB, 500MB, 2GB or a number of bytes)")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(f"a size must be positive, got {value!r}")
    return size
