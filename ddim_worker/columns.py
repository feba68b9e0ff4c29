"""The row schema: every column a row carries, declared once, and everything computed from the declarations.

A row is read from the manifest (``source``), gets its image (``prepare``), is edited (``engine``), has its files
written (``write``) and is recorded (``results``). Each :class:`Column` says its name, its Arrow type, the stage that
writes it and where else it goes: the results table, the summary the driver tallies, the packed dataset. The results
schema, the summary's fields, the dataset's columns, the manifest's setting columns (from ``EditSettings``) and the
engine actor's output arrays are all computed here, so a new per-row setting or output is one declaration plus the
code that computes it: an engine output names the ``EditOutput`` attribute it is read from, or a ``compute`` hook.

The schema travels with the job: the driver builds its ``StageContext`` (and the engine actors' arguments) from
:func:`current`, so every task and actor works with the schema the driver planned the results with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ddim_worker.rows import EDITED, FAILED, coerce_value, is_missing
from ddim_worker.core.settings import SETTING_NAMES, EditSettings, field_kind

# The stages, in the order a row goes through them.
SOURCE, PREPARE, ENGINE, WRITE, RESULTS = "source", "prepare", "engine", "write", "results"
STAGES = (SOURCE, PREPARE, ENGINE, WRITE, RESULTS)


@dataclass(frozen=True)
class Column:
    """One column of a row.

    ``type`` None marks a payload (pixels, PNG or trajectory bytes): it travels between stages, never into a table.
    ``ok_only``: recorded for ``ok`` rows only (null, or False, on the others). Engine and write outputs that are
    numbers are 0 on rows the stage did not reach; their text is null when empty.
    ``output``: an engine column read from this ``EditOutput`` attribute. ``compute``: an engine column computed as
    ``compute(edit_row, edit_output)``, or a results column computed as ``compute(finished_rows, columns_so_far)``
    (a list, one value per row). Engine columns with neither are the actor's own (timings, counters, blobs).
    """

    name: str
    type: pa.DataType | None
    stage: str
    results: bool = True
    summary: bool = False
    dataset: bool = False
    ok_only: bool = False
    output: str | None = None
    compute: Callable[..., Any] | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"column {self.name}: unknown stage {self.stage!r} (one of {', '.join(STAGES)})")
        if self.type is None and (self.results or self.dataset):
            raise ValueError(f"column {self.name}: a payload (type None) cannot be a results or dataset column")

    @property
    def is_output(self) -> bool:
        """Whether this column is work the engine or the write stage did (0 or null where it did not run)."""
        return self.stage in (ENGINE, WRITE)

    def empty(self, n: int) -> np.ndarray:
        """The column's array for ``n`` rows the stage has not filled: NaN, 0, False or "" (text is never None in
        flight: a block of Nones would get another Arrow type than a block of strings, and Ray could not join them)."""
        kind = self.type
        if kind is None or pa.types.is_string(kind) or pa.types.is_list(kind):  # lists travel as JSON text
            return np.array([""] * n, dtype=object)
        if pa.types.is_floating(kind):
            return np.full(n, np.nan)
        if pa.types.is_boolean(kind):
            return np.zeros(n, bool)
        if pa.types.is_integer(kind):
            return np.zeros(n, np.int64)
        return np.array([None] * n, dtype=object)


def _setting_type(spec: dataclasses.Field) -> pa.DataType:
    return {int: pa.int64(), float: pa.float64(), str: pa.string()}[field_kind(spec)]


def setting_columns() -> list[Column]:
    """The per-row settings, from ``EditSettings`` (negative prompt first: it is a prompt): manifest columns, results
    columns and dataset columns of the same name and type."""
    specs = {f.name: f for f in dataclasses.fields(EditSettings)}
    names = ("negative_prompt", *(n for n in SETTING_NAMES if n != "negative_prompt"))
    return [Column(n, _setting_type(specs[n]), SOURCE, dataset=True, doc=specs[n].metadata.get("help", ""))
            for n in names]


_SETTING_KINDS = {f.name: field_kind(f) for f in dataclasses.fields(EditSettings)}


def setting_value(name: str, value: Any) -> Any:
    """A setting of a row in flight as its declared type: Ray's batches turn an int column with nulls (failed rows)
    into floats and a text one into objects; a missing text is ""."""
    kind = _SETTING_KINDS[name]
    if kind is str and is_missing(value):
        return ""
    return kind(value.item() if hasattr(value, "item") else value)


def setting_values(values: Any) -> dict[str, Any]:
    """Every setting of a row (a mapping, or anything indexable by setting name) as its declared type."""
    return {name: setting_value(name, values[name]) for name in SETTING_NAMES}


@dataclass
class FinishedRows:
    """A batch of finished rows as the results stage sees it (Ray's NumPy batch), for results ``compute`` hooks."""

    batch: dict[str, Any]
    n: int
    default_dtype: str = ""
    generation: str = ""

    def column(self, name: str, default: object = None) -> list:
        return list(self.batch[name]) if name in self.batch else [default] * self.n


def _number(value: object, kind: pa.DataType, zero: float) -> Any:
    coerced = coerce_value(value, kind)
    return zero if coerced is None else coerced


def _guided(scale: object) -> bool:
    value = coerce_value(scale, pa.float64())
    return value is not None and value != 1.0


def _dtype(rows: FinishedRows, out: dict[str, list]) -> list:
    """The dtype the engine actor ran (a recovered row's: its PNG's), else the one the job planned."""
    return [coerce_value(d, pa.string()) or rows.default_dtype for d in rows.column("engine_dtype")]


def _unet_passes(rows: FinishedRows, out: dict[str, list]) -> list:
    return [sum(p) for p in zip(out["inversion_passes"], out["sampling_passes"], out["source_passes"],
                                out["mask_passes"])]


def _ideal_unet_samples(rows: FinishedRows, out: dict[str, list]) -> list:
    """What the row's work needs: passes, doubled where guidance is used (sampling: the edit and the source branch it
    leads; the mask's predictions are unguided)."""
    return [a * (2 if _guided(iw) else 1) + (b + s) * (2 if _guided(w) else 1) + c
            for a, b, s, c, iw, w in zip(out["inversion_passes"], out["sampling_passes"], out["source_passes"],
                                         out["mask_passes"], rows.column("inversion_guidance"),
                                         rows.column("guidance_scale"))]


def _seconds(rows: FinishedRows, out: dict[str, list]) -> list:
    stages = [rows.column(name, 0.0) for name in ("prepare_seconds", "engine_seconds", "write_seconds")]
    return [sum(_number(v, pa.float64(), 0.0) for v in values) for values in zip(*stages)]


def _generation(rows: FinishedRows, out: dict[str, list]) -> list:
    return [rows.generation or None] * rows.n


def _has_mask(row: Any, out: Any) -> bool:
    return out.mask is not None


#: The score columns and the field of ``core.candidates.Scores`` each one holds: the results' and the dataset's
#: columns, a PNG's ``ddim_edit:scores`` chunk and each kept candidate's record all take their names from here.
SCORE_FIELDS: dict[str, str] = {"score": "direction", "clip_image_similarity": "image_similarity",
                                "clip_text_similarity": "text_similarity"}


def score_values(scores: Any) -> dict[str, float | None]:
    """A ``Scores`` (or None: not scored) as its columns' values."""
    return {column: None if scores is None else float(getattr(scores, field))
            for column, field in SCORE_FIELDS.items()}


def _scored(column: str) -> Callable[[Any, Any], float | None]:
    """An engine column of one of the result's scores (None: not scored)."""
    def value(row: Any, out: Any) -> float | None:
        return score_values(out.scores)[column]
    value.__name__ = f"score_{SCORE_FIELDS[column]}"
    return value


#: The settings every result row records, in the order of ``EditSettings`` (negative prompt first: it is a prompt).
RESULT_SETTING_FIELDS: tuple[str, ...] = tuple(c.name for c in setting_columns())

_S, _I, _F, _B, _X = pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.binary()

#: ``all_candidates`` (--keep-candidates): each candidate of a row, its own image's uri, draws, scores and verdict. In
#: flight it is JSON text (``Column.empty``); the results read it as this type (``rows.coerce_value``).
KEPT_CANDIDATE = pa.struct([("candidate", _I), ("id", _S), ("uri", _S), ("cross_replace", _F), ("self_replace", _F),
                            ("score", _F), ("clip_image_similarity", _F), ("clip_text_similarity", _F),
                            ("passed", _B)])

#: Every column, in the results' order (columns outside the results anywhere among them).
COLUMNS: tuple[Column, ...] = (
    Column("id", _S, SOURCE, dataset=True),
    Column("image_url", _S, SOURCE, dataset=True),
    Column("source_prompt", _S, SOURCE, dataset=True),
    Column("edit_prompt", _S, SOURCE, dataset=True),
    *setting_columns(),
    Column("dtype", _S, RESULTS, summary=True, compute=_dtype, doc="the dtype the engine actor ran"),
    Column("status", _S, SOURCE, summary=True, doc="ok | filtered | failed | skipped; empty while in flight"),
    Column("error_code", _S, SOURCE, summary=True, doc="rows.ERROR_CODES"),
    Column("error", _S, SOURCE),
    Column("output_uri", _S, WRITE, doc="the edited PNG (with --no-save-images only the report's sample has one)"),
    Column("input_uri", _S, WRITE, doc="the preprocessed input (--save-inputs, or the report's sample)"),
    Column("reconstruction_uri", _S, WRITE, doc="--measure-fidelity"),
    Column("latent_uri", _S, WRITE, ok_only=True),
    Column("mask_uri", _S, WRITE, ok_only=True, doc="masks/<id>.png: what the edit changed (mask auto)"),
    Column("attention_control", _S, ENGINE, ok_only=True, output="attention_control",
           doc="none | word-swap | refine: how the edit read the source's attention"),
    Column("cache_hit", _B, ENGINE, summary=True, ok_only=True, output="cache_hit"),
    Column("inversion_passes", _I, ENGINE, summary=True, output="inversion_passes"),
    Column("sampling_passes", _I, ENGINE, output="sampling_passes"),
    Column("source_passes", _I, ENGINE, output="source_passes",
           doc="the source branch sampled beside the edits (once per image)"),
    Column("mask_passes", _I, ENGINE, output="mask_passes", doc="finding the mask (mask auto)"),
    Column("unet_passes", _I, RESULTS, summary=True, compute=_unet_passes),
    Column("unet_samples", _F, ENGINE, summary=True,
           doc="UNet samples run for the row: its share of its calls, padding included"),
    Column("ideal_unet_samples", _I, RESULTS, summary=True, compute=_ideal_unet_samples),
    Column("seconds", _F, RESULTS, compute=_seconds),
    Column("image_bytes", _I, WRITE, summary=True, doc="bytes of the edited PNG (stored in images/ or embedded)"),
    Column("input_bytes", _I, WRITE, summary=True,
           doc="bytes of this row's side images: inputs/, reconstructions/, masks/ and candidates/"),
    Column("latent_bytes", _I, WRITE, summary=True,
           doc="bytes this row wrote to the latent cache (0 on a cache hit or with it off)"),
    Column("candidate", _I, ENGINE, dataset=True, ok_only=True, output="candidate",
           doc="which of the row's candidates is its result (0-based; core.candidates)"),
    Column("candidate_cross_replace", _F, ENGINE, dataset=True, ok_only=True, output="cross_replace",
           doc="the cross_replace the result was made with (drawn from sample_cross_replace, else the row's)"),
    Column("candidate_self_replace", _F, ENGINE, dataset=True, ok_only=True, output="self_replace",
           doc="the self_replace the result was made with (drawn from sample_self_replace, else the row's)"),
    Column("score", _F, ENGINE, dataset=True, ok_only=True, compute=_scored("score"),
           doc="--scorer: CLIP directional similarity, the image's change vs the prompts' change (the ranking)"),
    Column("clip_image_similarity", _F, ENGINE, dataset=True, ok_only=True, compute=_scored("clip_image_similarity"),
           doc="--scorer: CLIP similarity of the edited image to the input"),
    Column("clip_text_similarity", _F, ENGINE, dataset=True, ok_only=True, compute=_scored("clip_text_similarity"),
           doc="--scorer: CLIP similarity of the edited image to the edit prompt"),
    Column("all_candidates", pa.list_(KEPT_CANDIDATE), WRITE, ok_only=True,
           doc="--keep-candidates: every candidate of the row (candidates/<p>/<id>.c<k>.png, its own id), with its "
               "draws, scores and the filter's verdict; null without the flag or with one candidate"),
    Column("psnr", _F, ENGINE, ok_only=True, output="psnr",
           doc="fidelity (--measure-fidelity): reconstruction vs preprocessed input, dB"),
    Column("ssim", _F, ENGINE, ok_only=True, output="ssim"),
    Column("latent_mse", _F, ENGINE, ok_only=True, output="latent_mse"),
    Column("manifest_row", _I, SOURCE, summary=True),
    Column("generation", _S, RESULTS, compute=_generation,
           doc="the ledger's order: the run and attempt that wrote the row (r000003-a01); the latest one wins"),
    Column("input_digest", _S, SOURCE,
           doc="what the row was made from (id, image reference, prompts, every resolved setting)"),
    # in flight only
    Column("embedded_image", None, SOURCE, results=False, doc="the manifest's embedded image bytes"),
    Column("carried", _X, SOURCE, results=False, doc="the manifest's own columns, pickled"),
    Column("inversion_key", _S, SOURCE, results=False, doc="rows sharing an inversion sort together"),
    Column("cache_uri", _S, PREPARE, results=False),
    Column("cache_blob", None, PREPARE, results=False),
    Column("prepare_seconds", _F, PREPARE, results=False),
    Column("recovered", _B, PREPARE, results=False, summary=True, doc="recorded from a PNG a killed run left"),
    Column("recovered_dtype", _S, PREPARE, results=False),
    Column("pixels", None, PREPARE, results=False, doc="the preprocessed input, (size, size, 3) uint8"),
    Column("edited", None, ENGINE, results=False, output="image"),
    Column("trajectory_blob", None, ENGINE, results=False, doc="new latents for the write stage to cache"),
    Column("mask_pixels", None, ENGINE, results=False, output="mask"),
    Column("has_mask", _B, ENGINE, results=False, compute=_has_mask),
    Column("passed", _B, ENGINE, results=False, output="passed", doc="the scorer's verdict (no scorer: true)"),
    Column("candidate_images", None, ENGINE, results=False,
           doc="--keep-candidates: the row's candidates (pickled core.candidates.KeptCandidate) for the write stage"),
    Column("reconstruction", None, ENGINE, results=False, output="reconstruction"),
    Column("engine_seconds", _F, ENGINE, results=False),
    Column("engine_dtype", _S, ENGINE, results=False),
    Column("png", None, WRITE, results=False, doc="the edited PNG's bytes, for --embed-images"),
    Column("write_seconds", _F, WRITE, results=False),
    Column("results_bytes", _F, RESULTS, results=False, summary=True, doc="the row's share of its shard's bytes"),
)


@dataclass(frozen=True)
class RowSchema:
    """A set of column declarations and what follows from them."""

    columns: tuple[Column, ...]

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"columns declared twice: {', '.join(repeated)}")

    def extended(self, *columns: Column) -> RowSchema:
        """This schema with more columns (results columns go last in the results, in the order given)."""
        return RowSchema(self.columns + tuple(columns))

    def __getitem__(self, name: str) -> Column:
        for column in self.columns:
            if column.name == name:
                return column
        raise KeyError(name)

    def restore_nulls(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``batch`` with every declared non-float column that arrived as all-NaN floats back to nulls. Ray Data reads
        a block's all-null column (a block of rows that failed before their settings were read) as NaN floats; passed
        on as floats, that block no longer concatenates with blocks whose column holds text or integers."""
        out = dict(batch)
        for name, values in batch.items():
            column = next((c for c in self.columns if c.name == name), None)
            if (column is None or column.type is None or pa.types.is_floating(column.type)
                    or not isinstance(values, np.ndarray) or values.dtype.kind != "f" or values.ndim != 1):
                continue
            if np.isnan(values).all():
                out[name] = np.full(len(values), None, dtype=object)
        return out

    def where(self, **conditions: Any) -> tuple[Column, ...]:
        """The columns whose attributes equal ``conditions`` (``stage=ENGINE``, ``results=True``...)."""
        return tuple(c for c in self.columns if all(getattr(c, k) == v for k, v in conditions.items()))

    @property
    def results_schema(self) -> pa.Schema:
        """The results table, one row per manifest row."""
        return pa.schema([pa.field(c.name, c.type) for c in self.where(results=True)])

    @property
    def summary_fields(self) -> tuple[str, ...]:
        """What the driver gets back per finished row: enough to count and to know which rows are done."""
        return tuple(c.name for c in self.where(summary=True))

    @property
    def dataset_columns(self) -> tuple[str, ...]:
        """Our columns in the packed dataset, after its images."""
        return tuple(c.name for c in self.where(dataset=True))

    @property
    def text_columns(self) -> tuple[str, ...]:
        """Text columns: "" in flight, never None (see ``Column.empty``)."""
        return tuple(c.name for c in self.columns if c.type is not None and pa.types.is_string(c.type))

    @property
    def engine_values(self) -> tuple[Column, ...]:
        """Engine columns read or computed from each row's ``EditOutput`` (the actor fills them generically)."""
        return tuple(c for c in self.where(stage=ENGINE) if c.type is not None and (c.output or c.compute))

    def payloads(self, *stages: str) -> tuple[str, ...]:
        """The payload columns written by ``stages`` (dropped once the files are written)."""
        return tuple(c.name for c in self.columns if c.type is None and c.stage in stages)


def _output_value(column: Column, values: list, ok: list[bool]) -> list:
    """An engine or write output as the results record it: 0 where the stage did not run, text null when empty,
    ``ok_only`` values null (False) on rows that are not ok."""
    kind = column.type
    if pa.types.is_boolean(kind):
        return [bool(v) and (k or not column.ok_only) for v, k in zip(values, ok)]
    if column.ok_only:
        return [v if k and v not in (None, "") else None for v, k in zip(values, ok)]
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        zero = 0 if pa.types.is_integer(kind) else 0.0
        return [zero if v is None else v for v in values]
    return [v or None for v in values]


def results_columns(batch: dict, n: int, default_dtype: str, schema: RowSchema | None = None,
                    generation: str = "") -> dict[str, list]:
    """The results columns (and the summary's) of a batch of finished rows (Ray's NumPy batch, as the stages leave
    it): declared types, outputs normalised (``_output_value``), results ``compute`` hooks run in order."""
    schema = schema or current()
    rows = FinishedRows(batch, n, default_dtype, generation)
    wanted = [c for c in schema.columns if (c.results or c.summary) and c.type is not None]
    out = {c.name: [coerce_value(v, c.type) for v in rows.column(c.name)] for c in wanted}
    out["status"] = [str(s) if s else FAILED for s in rows.column("status")]  # pending here: lost, so failed
    ok = [s in EDITED for s in out["status"]]
    for name in ("error_code", "error"):  # a skipped row keeps its reason
        out[name] = [v if not k and v else None for v, k in zip(out[name], ok)]
    for column in wanted:
        if column.is_output:
            out[column.name] = _output_value(column, out[column.name], ok)
        elif pa.types.is_boolean(column.type):
            out[column.name] = [bool(v) for v in out[column.name]]
    for column in wanted:
        if column.stage == RESULTS and column.compute is not None:
            out[column.name] = list(column.compute(rows, out))
    return out


def results_table(rows: list[dict], schema: RowSchema | None = None) -> pa.Table:
    """Rows as a table in the results schema (missing fields null), sorted by manifest order."""
    results = (schema or current()).results_schema
    rows = sorted(rows, key=lambda r: (r.get("manifest_row") is None, r.get("manifest_row") or 0))
    return pa.table({f.name: [coerce_value(r.get(f.name), f.type) for r in rows] for f in results}, schema=results)


def output_columns(schema: RowSchema, n: int, rows: dict[int, Any], outputs: dict[int, Any]) -> dict[str, np.ndarray]:
    """The engine columns of ``n`` rows from the outputs of those edited (by row): each declared ``output`` attribute
    or ``compute`` hook, the column's empty value where a row has no output or the output says None."""
    arrays = {c.name: c.empty(n) for c in schema.engine_values}
    for i, out in outputs.items():
        for c in schema.engine_values:
            value = c.compute(rows[i], out) if c.compute else getattr(out, c.output, None)
            if value is not None:
                arrays[c.name][i] = value
    return arrays


#: The schema every job uses unless a test or an extension replaces it (``current`` reads it at call time).
ROW_SCHEMA = RowSchema(COLUMNS)


#: The results table's schema with the columns declared here (``current().results_schema`` is the one in force).
RESULTS_SCHEMA = ROW_SCHEMA.results_schema


def current() -> RowSchema:
    """The row schema in force in this process: the driver reads it once and ships it to its tasks and actors."""
    return ROW_SCHEMA
