"""The results table as Parquet shards under ``OUTPUT/results/``: written once, never rewritten.

Each shard holds finished rows of one kind: ``ok-<generation>-<token>.parquet`` (edited, for good) or
``retry-<generation>-<token>.parquet`` (failed, or not run: the next run tries them again). A generation is one pass of
the job over the rows left to do (a run, or a re-run after Ray aborted the dataset). A run skips the ids of every ok
shard, re-tries everything else, and when it is over deletes the retry shards of older generations: their rows were
all tried again and have newer results. So after every run, reading ``results/`` as one table gives exactly one row
per manifest row, in its latest state, without any step rewriting a shard or reading all rows so far.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import OK, RESULTS_SCHEMA

OK_KIND, RETRY_KIND = "ok", "retry"

#: Hugging Face ``datasets`` reads an ``Image`` feature from a struct column when the schema metadata says so.
EDITED_IMAGE = pa.field("edited_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def new_generation(attempt: int) -> str:
    """Sortable and unique per run and attempt: ``20261126T081500-1a2b3c-a1``."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}-a{attempt}"


def shard_name(kind: str, generation: str) -> str:
    return f"{kind}-{generation}-{uuid.uuid4().hex[:12]}.parquet"


def parse_name(name: str) -> tuple[str, str] | None:
    """(kind, generation) of a shard's file name; None for anything else."""
    kind, sep, rest = name.partition("-")
    if not sep or kind not in (OK_KIND, RETRY_KIND) or not name.endswith(".parquet"):
        return None
    generation = rest.removesuffix(".parquet").rsplit("-", 1)[0]
    return kind, generation


def results_schema(carried: pa.Schema, embed_images: bool) -> pa.Schema:
    """Our columns, the manifest's own columns, and ``edited_image`` with ``--embed-images``."""
    fields = list(RESULTS_SCHEMA) + list(carried)
    if embed_images:
        fields.append(EDITED_IMAGE)
    schema = pa.schema(fields)
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": hf_features(schema)}})})


def hf_features(schema: pa.Schema) -> dict:
    """The ``datasets`` features of a results table (``edited_image`` as an ``Image``), without importing it where
    it is missing: the same JSON ``datasets.Features.to_dict`` writes, for the types results have."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        plain = pa.schema([f for f in schema if f.name != EDITED_IMAGE.name])
        try:
            features = datasets.Features.from_arrow_schema(plain)
        except Exception:  # noqa: BLE001 - a type datasets cannot describe: fall back to the plain mapping
            features = None
        if features is not None:
            if EDITED_IMAGE.name in schema.names:
                features[EDITED_IMAGE.name] = datasets.Image()
            return features.to_dict()
    out = {}
    for f in schema:
        if f.name == EDITED_IMAGE.name:
            out[f.name] = {"_type": "Image"}
        else:
            out[f.name] = {"dtype": _value_dtype(f.type), "_type": "Value"}
    return out


def _value_dtype(kind: pa.DataType) -> str:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "string"
    if pa.types.is_boolean(kind):
        return "bool"
    return str(kind).replace("double", "float64").replace("float", "float32") if pa.types.is_floating(kind) \
        else str(kind)


def write_shard(layout: OutputLayout, table: pa.Table, generation: str, storage_options: dict | None) -> list[str]:
    """Split finished rows into an ok shard and a retry shard and write them; returns the objects written."""
    written = []
    is_ok = pc.equal(table.column("status"), OK)
    for kind, mask in ((OK_KIND, is_ok), (RETRY_KIND, pc.invert(is_ok))):
        part = table.filter(mask)
        if part.num_rows:
            sink = pa.BufferOutputStream()
            pq.write_table(part, sink)
            uri = storage.join_uri(layout.results_folder, shard_name(kind, generation))
            storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_options)
            written.append(uri)
    return written


@dataclass(frozen=True)
class Shard:
    name: str
    kind: str
    generation: str


def list_shards(layout: OutputLayout, storage_options: dict | None) -> list[Shard]:
    """The result shards under ``results/`` (one listing of one folder: a shard holds hundreds of rows)."""
    shards = []
    for name in storage.list_names(layout.results_folder, storage_options, suffix=".parquet"):
        parsed = parse_name(name)
        if parsed:
            shards.append(Shard(name, *parsed))
    return shards


def shard_uris(layout: OutputLayout, shards: Iterable[Shard]) -> list[str]:
    return [storage.join_uri(layout.results_folder, s.name) for s in shards]


def remove_superseded(layout: OutputLayout, generation: str, storage_options: dict | None) -> int:
    """Delete the retry shards of generations before ``generation``: their rows were tried again."""
    old = [s for s in list_shards(layout, storage_options) if s.kind == RETRY_KIND and s.generation != generation]
    for uri in shard_uris(layout, old):
        storage.remove(uri, storage_options)
    return len(old)


def remove_all(layout: OutputLayout, storage_options: dict | None) -> int:
    """``--overwrite``: every earlier result goes (the rows are all redone)."""
    shards = list_shards(layout, storage_options)
    for uri in shard_uris(layout, shards):
        storage.remove(uri, storage_options)
    return len(shards)


def read_keys(uris: list[str], storage_options: dict | None) -> tuple[list[str | None], list[int]]:
    """The ids and manifest rows of some shards (used by Ray tasks, a few shards each)."""
    ids: list[str | None] = []
    rows: list[int] = []
    for uri in uris:
        data = storage.read_bytes(uri, storage_options)
        table = pq.read_table(pa.BufferReader(data), columns=["id", "manifest_row"])
        ids.extend(table.column("id").to_pylist())
        rows.extend(-1 if r is None else r for r in table.column("manifest_row").to_pylist())
    return ids, rows


def sample_rows(layout: OutputLayout, storage_options: dict | None, limit: int, generation: str | None = None,
                kinds: tuple[str, ...] = (OK_KIND, RETRY_KIND)) -> list[dict]:
    """Up to ``limit`` result rows, reading as few shards as that takes (the report at scale)."""
    rows: list[dict] = []
    shards = [s for s in list_shards(layout, storage_options) if s.kind in kinds
              and (generation is None or s.generation == generation)]
    for uri in shard_uris(layout, sorted(shards, key=lambda s: s.name)):
        if len(rows) >= limit:
            break
        table = pq.read_table(pa.BufferReader(storage.read_bytes(uri, storage_options)))
        if EDITED_IMAGE.name in table.column_names:
            table = table.drop_columns([EDITED_IMAGE.name])
        rows.extend(table.slice(0, limit - len(rows)).to_pylist())
    return rows


def read_results(layout: OutputLayout, storage_options: dict | None) -> pa.Table:
    """Every shard as one table (tests and small jobs; a large job's results are read with any Parquet reader)."""
    shards = list_shards(layout, storage_options)
    tables = [pq.read_table(pa.BufferReader(storage.read_bytes(uri, storage_options)))
              for uri in shard_uris(layout, shards)]
    if not tables:
        return RESULTS_SCHEMA.empty_table()
    return pa.concat_tables(tables, promote_options="default")
