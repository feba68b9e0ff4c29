"""Per-row outcomes: the statuses, the stable error codes, and how a value of a row becomes a table's value.

The columns themselves (the results schema, the summary, the dataset) are declared in ``ddim_worker.columns``.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
FILTERED = "filtered"  # edited, scored, and no candidate passed the scorer's thresholds: kept out of the dataset
PENDING = ""  # status of a row still in flight
EDITED = (OK, FILTERED)  # rows the engine edited and the write stage wrote: their outputs are recorded

#: Stable error codes (the ``error_code`` column); the human ``error`` column says what exactly went wrong.
ERROR_CODES = (
    "missing_image",  # the row names no image (a null or empty image_url and no embedded image)
    "fetch_failed",  # the image could not be read (network error, 4xx, storage error) after retries
    "fetch_timeout",  # the image source did not answer within --fetch-timeout
    "not_found",  # 404 / missing object / missing file
    "too_large",  # over --max-download-bytes or --max-pixels (decompression bombs are refused before decoding)
    "not_an_image",  # empty, or not a format Pillow reads
    "bad_image",  # truncated, corrupt or smaller than --min-image-side
    "bad_setting",  # a per-row setting or id that cannot be used
    "bad_prompt",  # a missing, empty, non-text or over-long prompt
    "unsafe_url",  # refused by the URL policy (private network, local file outside the manifest, unknown scheme)
    "duplicate_id",  # a second row with an id already in the manifest
    "opted_out",  # the image's server opts it out of AI use (X-Robots-Tag noai, noimageai, noindex, noimageindex)
    "engine_error",  # the engine failed on this row alone
    "score_failed",  # the scorer could not score this row's candidates
    "write_failed",  # the outputs could not be written
)


class RowError(Exception):
    """A row-level failure with a stable code; it fails that row and never the job."""

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message


def is_missing(value: object) -> bool:
    """A null in any of the forms a value takes on its way through pyarrow, NumPy, pandas and Ray Data: None, NaN
    (float or NumPy), pandas ``NA`` / ``NaT``. Never turned into the text ``"nan"`` or ``"None"``."""
    if value is None:
        return True
    if isinstance(value, float) or type(value).__module__ == "numpy" and hasattr(value, "dtype") \
            and getattr(value, "ndim", 1) == 0 and value.dtype.kind == "f":
        return bool(math.isnan(float(value)))
    return type(value).__name__ in ("NAType", "NaTType")


def text_or_none(value: object) -> str | None:
    """``value`` as text, or None when it is missing (see :func:`is_missing`); bytes are not text."""
    if is_missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value if isinstance(value, str) else str(value)


def coerce_value(value: object, type_: pa.DataType) -> object:
    """Ray's NumPy batches turn nulls into NaN and ints into NumPy scalars; the table wants None and Python values.

    A value that cannot be one (a bad setting of a failed row: its ``error`` says what it was) becomes None.
    """
    try:
        return _coerce_or_raise(value, type_)
    except (TypeError, ValueError, OverflowError):
        return None


def _coerce_or_raise(value: object, type_: pa.DataType) -> object:
    if is_missing(value):
        return None
    if hasattr(value, "item"):
        value = value.item()
    if pa.types.is_string(type_):
        return str(value)
    if pa.types.is_integer(type_):
        return int(value)
    if pa.types.is_floating(type_):
        return float(value)
    if pa.types.is_boolean(type_):
        return bool(value)
    if pa.types.is_list(type_) and isinstance(value, str):  # a list column in flight is JSON text ("": none)
        return json.loads(value) if value else None
    return value
