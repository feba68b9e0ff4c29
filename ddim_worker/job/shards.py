"""The results table as Parquet shards under ``OUTPUT/results/``: the job's ledger, written by its tasks.

Each shard holds finished rows of one kind: ``ok-<generation>-<digest>.parquet`` (edited) or
``retry-<generation>-<digest>.parquet`` (failed, or not run: the next run tries them again). A generation is one pass
of the job over the rows left to do: ``r000003-a01`` is run 3, attempt 1 (a re-run after Ray aborted the dataset is
the next attempt). Compaction writes ``ok-<generation>-c0002-<digest>.parquet``: the sequence number of its pass, one
more than any shard's, so a rewritten shard never takes the name of a shard that exists, and wins over the copy it
was made from (``ledger``). The digest is a hash of the shard's rows' ledger keys, so a shard's name and content are
a function of what it records: a write task that Ray retries rewrites the same object instead of adding one. Every
row also carries its ``generation``; ``ledger`` resolves one row per id (the latest generation wins) and compacts the
shards so that any Parquet reader sees one row per id after a run.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.columns import current
from ddim_worker.manifest import ledger_key
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import OK

OK_KIND, RETRY_KIND = "ok", "retry"

#: Hugging Face ``datasets`` reads an ``Image`` feature from a struct column when the schema metadata says so.
EDITED_IMAGE = pa.field("edited_image", pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


_GENERATION = re.compile(r"^r(\d{6,})-a(\d{2,})$")
_COMPACTION = re.compile(r"^(.+)-c(\d{4,})$")


def generation_name(run: int, attempt: int) -> str:
    """``r000003-a01``: run 3 of this output, attempt 1. Runs are numbered from the ledger itself (one more than any
    shard's), and one run at a time holds an output (its lease), so the numbers order the runs."""
    return f"r{run:06d}-a{attempt:02d}"


def generation_order(generation: str) -> tuple:
    """A sort key of a generation: later runs and attempts sort later. Generations of shards written before runs
    were numbered (``20261126T081500-1a2b3c-a1``) sort before every numbered one, by their time stamp."""
    match = _GENERATION.match(generation)
    return (1, int(match.group(1)), int(match.group(2))) if match else (0, generation)


def next_run(shards: Iterable[Shard]) -> int:
    """The number of the run about to start: one more than any shard records."""
    runs = [generation_order(s.generation)[1] for s in shards if generation_order(s.generation)[0] == 1]
    return max(runs, default=0) + 1


def keys_digest(keys: Iterable[int]) -> str:
    """A shard's name part: a hash of its rows' ledger keys, sorted (the same rows give the same name)."""
    payload = ",".join(str(k) for k in sorted(int(k) for k in keys))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def shard_name(kind: str, generation: str, keys: Iterable[int], compaction: int = 0) -> str:
    """A write task's shard (``compaction`` 0), or one written by the compaction pass of that sequence number."""
    sequence = f"-c{compaction:04d}" if compaction else ""
    return f"{kind}-{generation}{sequence}-{keys_digest(keys)}.parquet"


def parse_name(name: str) -> tuple[str, str, int] | None:
    """(kind, generation, compaction sequence) of a shard's file name (sequence 0: written by a task, or named
    before compaction had sequences); None for anything else."""
    kind, sep, rest = name.partition("-")
    if not sep or kind not in (OK_KIND, RETRY_KIND) or not name.endswith(".parquet"):
        return None
    generation = rest.removesuffix(".parquet").rsplit("-", 1)[0]
    match = _COMPACTION.match(generation)
    if match:
        return kind, match.group(1), int(match.group(2))
    return kind, generation, 0


def next_compaction(shards: Iterable[Shard]) -> int:
    """The sequence number of a compaction pass about to write: one more than any shard has, so none of its names
    exists yet and its copies outrank the ones they replace."""
    return max((s.compaction for s in shards), default=0) + 1


def results_schema(carried: pa.Schema, embed_images: bool) -> pa.Schema:
    """Our columns (the row schema in force, ``columns.current``), the manifest's own columns, and ``edited_image``
    with ``--embed-images``."""
    fields = list(current().results_schema) + list(carried)
    if embed_images:
        fields.append(EDITED_IMAGE)
    schema = pa.schema(fields)
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": hf_features(schema)}})})


#: Columns that hold PNGs as ``{bytes, path}`` structs: ``datasets`` reads them as ``Image`` features.
IMAGE_COLUMNS = (EDITED_IMAGE.name, "edit_mask")


def hf_features(schema: pa.Schema, images: tuple[str, ...] = IMAGE_COLUMNS) -> dict:
    """The ``datasets`` features of a table whose ``images`` columns are PNG structs (``Image`` features), without
    importing it where it is missing: the same JSON ``datasets.Features.to_dict`` writes, for the types we have."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        images = tuple(name for name in images if name in schema.names)
        plain = pa.schema([f for f in schema if f.name not in images])
        try:
            features = datasets.Features.from_arrow_schema(plain)
        except Exception:  # noqa: BLE001 - a type datasets cannot describe: fall back to the plain mapping
            features = None
        if features is not None:
            described = {f.name: (datasets.Image() if f.name in images else features[f.name]) for f in schema}
            return datasets.Features(described).to_dict()
    out = {}
    for f in schema:
        if f.name in images:
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


def table_keys(table: pa.Table) -> list[int]:
    """The ledger key of every row of a results table (its id's hash, or its manifest position; see
    ``manifest.ledger_key``)."""
    return [ledger_key(i, c, r if r is not None else -1) for i, c, r in
            zip(table.column("id").to_pylist(), table.column("error_code").to_pylist(),
                table.column("manifest_row").to_pylist())]


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_shard(layout: OutputLayout, table: pa.Table, generation: str,
                storage_options: dict | None) -> list[tuple[str, int]]:
    """Split finished rows into an ok shard and a retry shard and write them; returns (object, bytes) written.

    Their names are a function of the rows (see ``shard_name``): run twice on the same rows, it writes the same two
    objects again.
    """
    written = []
    is_ok = pc.equal(table.column("status"), OK)
    for kind, mask in ((OK_KIND, is_ok), (RETRY_KIND, pc.invert(is_ok))):
        part = table.filter(mask)
        if part.num_rows:
            uri = storage.join_uri(layout.results_folder, shard_name(kind, generation, table_keys(part)))
            data = parquet_bytes(part)
            storage.write_bytes(uri, data, storage_options)
            written.append((uri, len(data)))
    return written


@dataclass(frozen=True)
class Shard:
    name: str
    kind: str
    generation: str
    compaction: int = 0  # the compaction pass that wrote it (0: a write task)


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


def remove_all(layout: OutputLayout, storage_options: dict | None) -> int:
    """``--overwrite``: every earlier result goes (the rows are all redone)."""
    shards = list_shards(layout, storage_options)
    for uri in shard_uris(layout, shards):
        storage.remove(uri, storage_options)
    return len(shards)


