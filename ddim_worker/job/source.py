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

import hashlib
import pickle
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker.manifest import (
    ManifestError,
    ManifestFiles,
    embedded_bytes,
    find_manifest_files,
    resolve_columns,
    row_id,
    row_settings,
)
from ddim_worker.rows import FAILED, PENDING, RESULTS_SCHEMA, SKIPPED, RowError
from ddim_worker.settings import EditSettings

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


def _footer(uri: str, storage_options: dict) -> pq.FileMetaData:
    with fsspec.open(uri, "rb", **storage_options) as handle:
        return pq.ParquetFile(handle).metadata


def plan_source(uri: str, mapping: Mapping[str, str], storage_options: dict | None = None,
                limit: int | None = None) -> ManifestSource:
    """Files, columns and row groups of a manifest, from its footers only."""
    options = storage_options or {}
    files = find_manifest_files(uri, options)
    with ThreadPoolExecutor(min(FOOTER_THREADS, len(files.files))) as pool:
        footers = list(pool.map(lambda f: _footer(f, options), files.files))
    schema = footers[0].schema.to_arrow_schema()
    columns = resolve_columns(schema.names, mapping)
    for file_uri, footer in zip(files.files[1:], footers[1:]):
        if resolve_columns(footer.schema.to_arrow_schema().names, mapping) != columns:
            raise ManifestError(f"{file_uri} has different columns from the manifest's first file")
    ours = set(columns.values())
    taken = set(RESULTS_SCHEMA.names) | {"edited_image"}
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


def id_hash(row_id_text: str) -> int:
    """A 64-bit hash of an id (never 0, which marks "no id"), for duplicate and done checks in NumPy."""
    value = int.from_bytes(hashlib.blake2b(row_id_text.encode(), digest_size=8).digest(), "little")
    return value or 1


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
            if "image" in record and not record.get("image_url"):
                data, path = embedded_bytes(record.get("image"))
                if data is not None:
                    row.image_bytes = data
                    record["image_digest"] = hashlib.sha256(data).hexdigest()
                elif path:
                    record["image_url"] = path
            record.pop("image", None)
            row.values = {**record, **row_settings(record, defaults, max_prompt_chars)}
            row.id = row_id(record)
        except RowError as exc:
            row.error = exc
            given = record.get("id")
            row.id = str(given) if given is not None else None
        yield row


@dataclass(frozen=True)
class SourceContext:
    """What the reading tasks need: the source, the job's row defaults, and the driver's two small indexes."""

    source: ManifestSource
    defaults: EditSettings
    max_prompt_chars: int
    duplicates: dict[int, int] = field(default_factory=dict)  # id hash -> the first manifest row with that id
    done: Any = None  # sorted uint64 array (or an ObjectRef of one) of id hashes an earlier run finished
    finished: Any = None  # bool per manifest row (or an ObjectRef): rows that already have a result this run
    not_run: str | None = None  # record the rows left as skipped, with this reason, instead of running them


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


#: What a row's id depends on: the given id, or its content (see ``manifest.row_id``).
ID_INPUTS = ("id", "image_url", "image", "source_prompt", "edit_prompt", "negative_prompt", "num_steps",
             "start_step", "guidance_scale", "inversion_guidance", "eta", "seed", "inversion", "cross_replace",
             "self_replace", "edit_word_weight", "mask")


def _index_hash(record: dict[str, Any]) -> int:
    try:
        if "image" in record and not record.get("image_url") and record.get("id") is None:
            data, path = embedded_bytes(record.get("image"))
            if data is not None:
                record["image_digest"] = hashlib.sha256(data).hexdigest()
            elif path:
                record["image_url"] = path
        record.pop("image", None)
        return id_hash(row_id(record))
    except RowError:
        return 0


def _resolve(value: Any) -> Any:
    if value is not None and type(value).__name__ == "ObjectRef":
        import ray

        return ray.get(value)
    return value


#: Our columns of a row in flight, in the order the stages and the results use.
ROW_FIELDS = ("id", "image_url", "source_prompt", "edit_prompt", "negative_prompt", "num_steps", "start_step",
              "guidance_scale", "inversion_guidance", "eta", "seed", "inversion", "cross_replace", "self_replace",
              "edit_word_weight", "mask", "manifest_row")


def inversion_order(values: Mapping[str, Any], image_digest: str | None) -> str:
    """Rows with equal keys share an inversion (image, source prompt, inversion settings): sorting by it puts them
    next to each other, so they land in one engine batch and are inverted once."""
    return "\x1f".join(str(v) for v in (values.get("image_url") or image_digest or "", values.get("source_prompt"),
                                         values.get("negative_prompt"), values.get("num_steps"),
                                         values.get("inversion_guidance"), values.get("inversion")))


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
                      image_bytes=row.image_bytes or b"", carried=pickle.dumps(row.carried, protocol=5))
        if row.error is not None:
            record.update(status=FAILED, error_code=row.error.code, error=row.error.message)
        else:
            h = id_hash(row.id)
            first = ctx.duplicates.get(h)
            if first is not None and first != row.manifest_row:
                record.update(status=FAILED, error_code="duplicate_id",
                              error=f"id {row.id!r} is also manifest row {first}; ids must be unique")
            elif done is not None and len(done) and _contains(done, h):
                continue  # finished by an earlier run: its result row is in an earlier shard
            elif ctx.not_run:
                record.update(status=SKIPPED, error=ctx.not_run)
        record["inversion_key"] = inversion_order(row.values, row.values.get("image_digest"))
        out.append(record)
    if not out:
        return None
    out.sort(key=lambda r: (r["inversion_key"], r["manifest_row"]))
    return {name: np.array([r[name] for r in out], dtype=object) for name in out[0]}


def _contains(sorted_hashes: np.ndarray, value: int) -> bool:
    i = int(np.searchsorted(sorted_hashes, np.uint64(value)))
    return i < len(sorted_hashes) and int(sorted_hashes[i]) == value


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
