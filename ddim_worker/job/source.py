"""Streaming the manifest: its row groups are the unit of reading, and Ray tasks read and validate them.

The driver only reads the files' footers (a few KB each) to list the row groups, so a manifest of millions of rows
never passes through it. Each task reads whole row groups (embedded image bytes included, so an image is read once,
with its group) and turns every row into our columns: the row's settings through the one validator, its stable id,
its failure if it has one, and the manifest's own columns carried along for the results.

Two small per-row facts do reach the driver: a 64-bit hash of each id (``index_groups``: duplicates are found with
NumPy over one array of hashes, 8 bytes a row, and a resumed job skips the ids already done) and, as rows finish, a
bit per row. Nothing else grows with the manifest.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker.columns import SOURCE, current
from ddim_worker.manifest import (
    OUR_COLUMNS,
    ManifestError,
    ManifestFiles,
    find_manifest_files,
    id_hash,
    image_reference,
    input_digest,
    resolve_columns,
    row_id,
    row_settings,
)
from ddim_worker.rows import FAILED, PENDING, SKIPPED, RowError, is_missing, text_or_none
from ddim_worker.core.inversion_key import SEPARATOR, InversionKey
from ddim_worker.core.settings import EditSettings
from ddim_worker.job.task_packing import FILLER, pack_tasks

#: Footers read at once when a manifest has many files (object stores answer in parallel).
FOOTER_THREADS = 16


@dataclass(frozen=True)
class RowGroup:
    """One row group of one manifest file, and where its rows sit in the manifest (``first_row``, 0-based)."""

    file: int
    group: int
    first_row: int
    rows: int  # rows to read from its start (``--limit`` may cut the last group)


@dataclass(frozen=True)
class ManifestSource:
    """What the tasks need to read the manifest: files, column mapping, carried columns, row groups."""

    files: ManifestFiles
    columns: dict[str, str]  # ours -> the manifest's column
    carried: dict[str, str]  # the manifest's own column -> its name in the results
    carried_schema: pa.Schema  # their types, under their names in the results
    groups: tuple[RowGroup, ...]
    total_rows: int
    storage_options: dict = field(default_factory=dict)

    @property
    def image_column(self) -> str | None:
        return self.columns.get("image")

    def descriptors(self) -> list[dict[str, int]]:
        """The row groups as Ray Data items."""
        return [{"file": g.file, "group": g.group, "first_row": g.first_row, "rows": g.rows} for g in self.groups]


#: Every Parquet file starts and ends with these bytes; the smallest possible file holds both and a footer length.
PARQUET_MAGIC = b"PAR1"
MIN_PARQUET_BYTES = 12


def _footer(uri: str, storage_options: dict) -> pq.FileMetaData:
    """A manifest file's footer, or a ``ManifestError`` that says what the file is instead (text, CSV, truncated)."""
    try:
        with fsspec.open(uri, "rb", **storage_options) as handle:
            size = handle.size if getattr(handle, "size", None) is not None else handle.seek(0, 2)
            if size < MIN_PARQUET_BYTES:
                raise ManifestError(f"manifest file {uri} is not Parquet: {size} bytes, too short for a Parquet file "
                                    "(truncated?)")
            handle.seek(0)
            head = handle.read(4)
            if head != PARQUET_MAGIC:
                raise ManifestError(f"manifest file {uri} is not Parquet: it starts with {head!r}, not {PARQUET_MAGIC!r} "
                                    "(a CSV or text file named .parquet?)")
            handle.seek(size - 4)
            if handle.read(4) != PARQUET_MAGIC:
                raise ManifestError(f"manifest file {uri} is truncated: it has no Parquet footer at its end")
            handle.seek(0)
            return pq.ParquetFile(handle).metadata
    except ManifestError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise ManifestError(f"cannot read manifest file {uri}: {type(exc).__name__}: {exc}") from None


def check_same_schema(files: tuple[str, ...], schemas: list[pa.Schema]) -> None:
    """Every file of a manifest has the first file's columns with the first file's types: a task reading the second
    file must never find a column missing (naming the file and the column here beats a failed dataset later)."""
    first_uri, first = files[0], schemas[0]
    for uri, schema in zip(files[1:], schemas[1:]):
        for f in first:
            if f.name not in schema.names:
                raise ManifestError(f"manifest file {uri} lacks column {f.name!r}, which {first_uri} has: every file "
                                    "of a manifest needs the same columns")
            other = schema.field(f.name).type
            if not other.equals(f.type):
                raise ManifestError(f"column {f.name!r} is {other} in manifest file {uri} but {f.type} in "
                                    f"{first_uri}: every file of a manifest needs the same column types")
        extra = [name for name in schema.names if name not in first.names]
        if extra:
            raise ManifestError(f"manifest file {uri} has column {extra[0]!r}, which {first_uri} lacks: every file "
                                "of a manifest needs the same columns")


def plan_source(uri: str, mapping: Mapping[str, str], storage_options: dict | None = None,
                limit: int | None = None) -> ManifestSource:
    """Files, columns and row groups of a manifest, from its footers only."""
    options = storage_options or {}
    files = find_manifest_files(uri, options)
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files.files))) as pool:
        footers = list(pool.map(lambda f: _footer(f, options), files.files))
    schemas = [footer.schema.to_arrow_schema() for footer in footers]
    schema = schemas[0]
    columns = resolve_columns(schema.names, mapping)
    check_same_schema(files.files, schemas)
    ours = set(columns.values())
    taken = set(current().results_schema.names) | {"edited_image"}
    carried = {name: (f"manifest_{name}" if name in taken else name) for name in schema.names if name not in ours}
    carried_schema = pa.schema([pa.field(carried[name], schema.field(name).type) for name in carried])
    groups, total = [], 0
    for index, footer in enumerate(footers):
        for group in range(footer.num_row_groups):
            rows = footer.row_group(group).num_rows
            if limit is not None:
                rows = min(rows, limit - total)
            if rows <= 0:
                break
            groups.append(RowGroup(index, group, total, rows))
            total += rows
    return ManifestSource(files, columns, carried, carried_schema, tuple(groups), total, options)


# -- reading a row group in a task -----------------------------------------------------------------------------------

def read_group(source: ManifestSource, group: RowGroup) -> pa.Table:
    with fsspec.open(source.files.files[group.file], "rb", **source.storage_options) as handle:
        table = pq.ParquetFile(handle).read_row_group(group.group)
    return table.slice(0, group.rows)


def _groups(batch: dict[str, np.ndarray]) -> Iterator[RowGroup]:
    for values in zip(batch["file"], batch["group"], batch["first_row"], batch["rows"]):
        yield RowGroup(*(int(v) for v in values))


@dataclass
class ParsedRow:
    """One manifest row in our vocabulary, validated: settings, id, image, its failure if any, carried values."""

    manifest_row: int
    values: dict[str, Any]
    id: str | None = None
    error: RowError | None = None
    image_bytes: bytes | None = None
    carried: dict[str, Any] = field(default_factory=dict)


def parse_rows(source: ManifestSource, table: pa.Table, first_row: int, defaults: EditSettings,
               max_prompt_chars: int) -> Iterator[ParsedRow]:
    """Every row of a row group in our columns, validated; a bad row carries its error, it never raises."""
    ours = {o: table.column(t).to_pylist() for o, t in source.columns.items()}
    carried = {name: table.column(name).to_pylist() for name in source.carried}
    for k in range(table.num_rows):
        record = {o: values[k] for o, values in ours.items()}
        row = ParsedRow(first_row + k, record, carried={source.carried[n]: v[k] for n, v in carried.items()})
        try:
            image_reference(record)
            row.image_bytes = record.pop("image_bytes", None)
            row.id = row_id(record)
            row.values = {**record, **row_settings(record, defaults, max_prompt_chars)}
            row.values["input_digest"] = input_digest(row.id, row.values)
        except RowError as exc:
            row.error = exc
            row.image_bytes = None
            row.id = row.id or text_or_none(record.get("id"))
        yield row


@dataclass(frozen=True)
class SourceContext:
    """What the reading tasks need: the source, the job's row defaults, and the driver's two small indexes."""

    source: ManifestSource
    defaults: EditSettings
    max_prompt_chars: int
    # id hash -> (the first manifest row with that id, its id): rows after it with the same id fail as duplicates
    duplicates: dict[int, tuple[int, str | None]] = field(default_factory=dict)
    done: Any = None  # a DoneSet (or an ObjectRef of one): the ids whose latest result is ok, and their inputs
    finished: Any = None  # bool per manifest row (or an ObjectRef): rows that already have a result
    not_run: str | None = None  # record the rows left as skipped, with this reason, instead of running them
    # Rows cut into engine tasks of ``calls_per_task`` calls of ``batch_size`` rows (``task_packing``); None: as read
    batch_size: int | None = None
    calls_per_task: int = 1

    @property
    def task_rows(self) -> int | None:
        """Rows per engine task (filler rows included), or None when the rows are not packed into tasks."""
        return self.batch_size * self.calls_per_task if self.batch_size else None


@dataclass(frozen=True)
class DoneSet:
    """The ids an earlier run finished (latest result ``ok``): sorted id hashes and, aligned, their input digests.

    A row is skipped only when its id is here *and* its inputs are the ones that result was made from.
    """

    hashes: np.ndarray  # uint64, sorted
    digests: np.ndarray  # uint64

    @classmethod
    def empty(cls) -> DoneSet:
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64))

    def __len__(self) -> int:
        return len(self.hashes)

    def matches(self, key: int, digest: str | None) -> bool:
        """Whether id hash ``key`` is done from the inputs ``digest`` names (a result written before digests were
        recorded, digest 0, counts as made from the same inputs)."""
        i = int(np.searchsorted(self.hashes, np.uint64(key)))
        if i >= len(self.hashes) or int(self.hashes[i]) != key:
            return False
        recorded = int(self.digests[i])
        return recorded == 0 or recorded == digest_number(digest)


def digest_number(digest: str | None) -> int:
    """An input digest (16 hex digits) as the uint64 the done set holds; 0 for none."""
    try:
        return int(str(digest), 16) if digest else 0
    except ValueError:
        return 0


def index_groups(batch: dict[str, np.ndarray], ctx: SourceContext) -> dict[str, np.ndarray]:
    """For each row of these row groups: its manifest row and its id's hash (0 where the row has no usable id).

    Only the id is worked out (a given id, or the hash of the row's content), not the row's settings: this pass runs
    before any row can start, so it does the least per row. A row whose settings are bad fails later anyway.
    """
    rows, hashes = [], []
    source = ctx.source
    for group in _groups(batch):
        names = [t for o, t in source.columns.items() if o in ID_INPUTS]
        table = read_group(source, group).select(list(dict.fromkeys(names)))
        columns = {o: table.column(t).to_pylist() for o, t in source.columns.items() if o in ID_INPUTS}
        for k in range(table.num_rows):
            record = {o: values[k] for o, values in columns.items()}
            rows.append(group.first_row + k)
            hashes.append(_index_hash(record))
    return {"manifest_row": np.array(rows, np.int64), "id_hash": np.array(hashes, np.uint64)}


#: What a row's id depends on: the given id, or its content (see ``manifest.row_id``): every column of ours.
ID_INPUTS = OUR_COLUMNS


def _index_hash(record: dict[str, Any]) -> int:
    try:
        if is_missing(record.get("id")):
            image_reference(record)  # a content id covers the image
        return id_hash(row_id(record))
    except RowError:
        return 0


def _resolve(value: Any) -> Any:
    if value is not None and type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


#: Our columns of a row in flight that come from the manifest row (``columns``: the source stage's results columns).
ROW_FIELDS = tuple(c.name for c in current().where(stage=SOURCE, results=True)
                   if c.name not in ("status", "error_code", "error"))


def row_inversion_key(values: Mapping[str, Any], image_digest: str | None) -> InversionKey | None:
    """The row's one inversion key (``inversion_key.InversionKey``; ddim and direct alike) from its image URL (or
    embedded image's digest) and settings; None for a row whose settings do not parse (it fails)."""
    try:
        return InversionKey.of(*_key_fields(values, image_digest))
    except (TypeError, ValueError):
        return None


def _key_fields(values: Mapping[str, Any], image_digest: str | None) -> tuple:
    return (values.get("image_url") or image_digest or "", values.get("source_prompt"), values.get("negative_prompt"),
            values.get("num_steps"), values.get("inversion_guidance"), values.get("inversion"), values.get("seed"))


def inversion_order(values: Mapping[str, Any], image_digest: str | None) -> str:
    """Rows with equal keys share an inversion: sorting by the text of their one inversion key puts them next to
    each other, so they land in one engine task and are inverted once. A row whose settings do not parse sorts by
    its raw values."""
    key = row_inversion_key(values, image_digest)
    return key.sort_text() if key is not None else SEPARATOR.join(str(v) for v in _key_fields(values, image_digest))


#: Rows sorted together by inversion key: a row group is read in slices of this many rows, so a task's memory stays
#: bounded whatever the manifest's row-group size. Rows of one image within a slice are inverted once; rows of it in
#: other slices find its trajectory in an engine actor's memory or in the latent cache.
READ_SLICE_ROWS = 8192


def read_rows(batch: dict[str, np.ndarray], ctx: SourceContext) -> Iterator[dict[str, np.ndarray]]:
    """``map_batches`` over row-group descriptors: the rows still to do, validated, sorted by inversion key.

    Rows an earlier run finished (their id's hash is in ``ctx.done``) are left out: their results already exist.
    A repeated id fails every row after its first with ``duplicate_id``.
    """
    done, finished = _resolve(ctx.done), _resolve(ctx.finished)
    for group in _groups(batch):
        table = read_group(ctx.source, group)
        for start in range(0, table.num_rows, READ_SLICE_ROWS):
            chunk = _rows_to_do(table.slice(start, READ_SLICE_ROWS), group.first_row + start, ctx, done, finished)
            if chunk:
                yield chunk


def _rows_to_do(table: pa.Table, first_row: int, ctx: SourceContext, done: Any,
                finished: Any) -> dict[str, np.ndarray] | None:
    out: list[dict[str, Any]] = []
    for row in parse_rows(ctx.source, table, first_row, ctx.defaults, ctx.max_prompt_chars):
        if finished is not None and finished[row.manifest_row]:
            continue
        record = {name: row.values.get(name) for name in ROW_FIELDS}
        record.update(id=row.id, manifest_row=row.manifest_row, status=PENDING, error_code="", error="",
                      embedded_image=row.image_bytes or b"", carried=pickle.dumps(row.carried, protocol=5))
        if row.error is not None:
            record.update(status=FAILED, error_code=row.error.code, error=row.error.message)
        else:
            h = id_hash(row.id)
            first_row, first_id = ctx.duplicates.get(h, (None, None))
            if first_row is not None and first_row != row.manifest_row:
                error = (f"id {row.id!r} is also manifest row {first_row}; ids must be unique" if first_id == row.id
                         else f"id {row.id!r} and id {first_id!r} (manifest row {first_row}) have the same 64-bit "
                              "hash; give one of them another id")
                record.update(status=FAILED, error_code="duplicate_id", error=error)
            elif done is not None and done.matches(h, row.values.get("input_digest")):
                continue  # finished by an earlier run from these inputs: its result row is in an earlier shard
            elif ctx.not_run:
                record.update(status=SKIPPED, error=ctx.not_run)
        key = row_inversion_key(row.values, row.values.get("image_digest"))
        record["inversion_key"] = inversion_order(row.values, row.values.get("image_digest"))
        out.append((record, key))
    if not out:
        return None
    out.sort(key=lambda pair: (pair[0]["inversion_key"], pair[0]["manifest_row"]))
    records = [record for record, _ in out]
    if ctx.task_rows:
        names = list(records[0])
        records = pack_tasks(records, [key for _, key in out], ctx.task_rows, ctx.batch_size, ctx.calls_per_task,
                             lambda: filler_record(names))
    return {name: np.array([r[name] for r in records], dtype=object) for name in records[0]}


def filler_record(names: list[str]) -> dict[str, Any]:
    """A row that holds an engine task's place (``task_packing``): no id, no image, status ``filler``."""
    record: dict[str, Any] = dict.fromkeys(names)
    record.update(id="", manifest_row=-1, status=FILLER, error_code="", error="", embedded_image=b"", carried=b"",
                  inversion_key="")
    return record


def find_duplicates(manifest_rows: np.ndarray, hashes: np.ndarray) -> dict[int, int]:
    """id hash -> first manifest row, for every id hash that occurs more than once (0, "no id", excluded)."""
    order = np.lexsort((manifest_rows, hashes))
    h, r = hashes[order], manifest_rows[order]
    repeated = np.flatnonzero((h[1:] == h[:-1]) & (h[1:] != 0))
    firsts: dict[int, int] = {}
    for i in repeated:
        firsts.setdefault(int(h[i]), int(r[i]))
    return firsts


def carried_table(values: list[bytes], schema: pa.Schema) -> pa.Table:
    """The carried manifest columns of a batch of finished rows, with the manifest's own types."""
    rows = [pickle.loads(v) if v else {} for v in values]
    return pa.table({f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in schema}, schema=schema)
