"""Per-row outcomes: the stable error codes and the results-table schema every row ends up in."""

from __future__ import annotations

import dataclasses
import math

import pyarrow as pa

from ddim_worker.settings import SETTING_NAMES, EditSettings, field_kind

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
PENDING = ""  # status of a row still in flight

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


#: The settings every result row records, in the order of ``EditSettings`` (negative prompt first: it is a prompt).
RESULT_SETTING_FIELDS = ("negative_prompt", *(n for n in SETTING_NAMES if n != "negative_prompt"))

_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string()}
_SETTING_TYPES = {f.name: _ARROW_TYPES[field_kind(f)] for f in dataclasses.fields(EditSettings)}

#: The results table, one row per manifest row.
RESULTS_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("image_url", pa.string()),
    ("source_prompt", pa.string()),
    ("edit_prompt", pa.string()),
    *((name, _SETTING_TYPES[name]) for name in RESULT_SETTING_FIELDS),
    ("dtype", pa.string()),  # the dtype the engine actor ran
    ("status", pa.string()),
    ("error_code", pa.string()),
    ("error", pa.string()),
    ("output_uri", pa.string()),  # the edited PNG (with --no-save-images only the report's sample has one)
    ("input_uri", pa.string()),  # the preprocessed input (--save-inputs, or the report's sample)
    ("reconstruction_uri", pa.string()),  # --measure-fidelity
    ("latent_uri", pa.string()),
    ("mask_uri", pa.string()),  # masks/<id>.png: what the edit changed (mask auto)
    ("attention_control", pa.string()),  # none | word-swap | refine: how the edit read the source's attention
    ("cache_hit", pa.bool_()),
    ("inversion_passes", pa.int64()),
    ("sampling_passes", pa.int64()),
    ("source_passes", pa.int64()),  # the source branch sampled beside the edits (once per image)
    ("mask_passes", pa.int64()),  # finding the mask (mask auto)
    ("unet_passes", pa.int64()),
    ("unet_samples", pa.float64()),  # UNet samples run for the row: its share of its calls, padding included
    ("ideal_unet_samples", pa.int64()),  # what the row's work needs: passes, doubled where guidance is used
    ("seconds", pa.float64()),
    ("image_bytes", pa.int64()),  # bytes of the edited PNG (stored in images/ or embedded)
    ("input_bytes", pa.int64()),  # bytes this row wrote to inputs/ and reconstructions/
    ("latent_bytes", pa.int64()),  # bytes this row wrote to the latent cache (0 on a cache hit or with it off)
    ("psnr", pa.float64()),  # fidelity (--measure-fidelity): reconstruction vs preprocessed input, dB
    ("ssim", pa.float64()),
    ("latent_mse", pa.float64()),
    ("manifest_row", pa.int64()),
    # The ledger's order: the run and attempt that wrote the row (``r000003-a01``); the latest one is the row's state.
    ("generation", pa.string()),
    # What the row was made from (id, image reference, prompts, every resolved setting): a rerun redoes a row whose
    # inputs changed under the same id, and a PNG is recovered only when its own record of this digest matches.
    ("input_digest", pa.string()),
])


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


def _coerce(value: object, type_: pa.DataType) -> object:
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
    return value


def results_table(rows: list[dict]) -> pa.Table:
    """Rows as a table in the results schema (missing fields null), sorted by manifest order."""
    rows = sorted(rows, key=lambda r: (r.get("manifest_row") is None, r.get("manifest_row") or 0))
    columns = {f.name: [_coerce(r.get(f.name), f.type) for r in rows] for f in RESULTS_SCHEMA}
    return pa.table(columns, schema=RESULTS_SCHEMA)


def _guided(scale: object) -> bool:
    value = _coerce(scale, pa.float64())
    return value is not None and value != 1.0


def results_columns(batch: dict, n: int, default_dtype: str) -> dict[str, list]:
    """The results schema's columns of a batch of finished rows (Ray's NumPy batch, as the stages leave it)."""

    def column(name: str, default: object = None) -> list:
        return list(batch[name]) if name in batch else [default] * n

    status = [str(s) if s else FAILED for s in column("status")]  # a row still pending here was lost: failed
    ok = [s == OK for s in status]
    inversion = [int(_coerce(v, pa.int64()) or 0) for v in column("inversion_passes", 0)]
    # sampled at the sampling guidance: the edit, and the source branch it leads (one per image); unguided: the mask's
    sampling = [int(_coerce(v, pa.int64()) or 0) for v in column("sampling_passes", 0)]
    source = [int(_coerce(v, pa.int64()) or 0) for v in column("source_passes", 0)]
    masking = [int(_coerce(v, pa.int64()) or 0) for v in column("mask_passes", 0)]
    sampled = [a + b for a, b in zip(sampling, source)]
    seconds = [sum(float(_coerce(v, pa.float64()) or 0.0) for v in values)
               for values in zip(column("prepare_seconds", 0.0), column("engine_seconds", 0.0),
                                 column("write_seconds", 0.0))]
    out: dict[str, list] = {f.name: [_coerce(v, f.type) for v in column(f.name)] for f in RESULTS_SCHEMA}
    out.update(
        status=status,
        error_code=[c if not k and c else None for c, k in zip(out["error_code"], ok)],
        error=[e if not k and e else None for e, k in zip(out["error"], ok)],  # skipped rows keep their reason
        output_uri=[u or None for u in out["output_uri"]],
        input_uri=[u or None for u in out["input_uri"]],
        reconstruction_uri=[u or None for u in out["reconstruction_uri"]],
        image_bytes=[int(v or 0) for v in out["image_bytes"]],
        input_bytes=[int(v or 0) for v in out["input_bytes"]],
        latent_bytes=[int(v or 0) for v in out["latent_bytes"]],
        dtype=[_coerce(d, pa.string()) or default_dtype for d in column("engine_dtype")],
        latent_uri=[u if k and u else None for u, k in zip(out["latent_uri"], ok)],
        mask_uri=[u if k and u else None for u, k in zip(out["mask_uri"], ok)],
        attention_control=[c if k and c else None for c, k in zip(out["attention_control"], ok)],
        cache_hit=[bool(_coerce(c, pa.bool_())) and k for c, k in zip(column("cache_hit", False), ok)],
        inversion_passes=inversion, sampling_passes=sampling, source_passes=source, mask_passes=masking,
        unet_passes=[a + b + c for a, b, c in zip(inversion, sampled, masking)],
        unet_samples=[float(_coerce(v, pa.float64()) or 0.0) for v in column("unet_samples", 0.0)],
        ideal_unet_samples=[a * (2 if _guided(iw) else 1) + b * (2 if _guided(w) else 1) + c
                            for a, b, c, iw, w in zip(inversion, sampled, masking, column("inversion_guidance"),
                                                      column("guidance_scale"))],
        seconds=seconds,
        recovered=[bool(_coerce(r, pa.bool_())) for r in column("recovered", False)],
    )
    for name in ("psnr", "ssim", "latent_mse"):
        out[name] = [v if k else None for v, k in zip(out[name], ok)]
    return out
