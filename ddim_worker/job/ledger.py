"""The ledger: the ``results/`` shards read as one table with one row per id, in its latest state.

Shards are written by tasks that Ray may run twice and by runs that redo some rows, so the same id can be recorded
more than once. Every row carries its ``generation`` (run and attempt, see ``shards.generation_name``); for each
ledger key (an id's hash, or the manifest position of a row whose id cannot be used) the row that wins is the one of
the latest generation, then the higher status (``ok`` over ``failed`` over ``skipped``: a task that finished a row
after the driver recorded it as not run), then the later compaction (a compacted shard's copy of a row over the copy
it was made from), then the shard name (identical copies). Never the file listing's order.

This module is the one reader: the driver's done set, its counts, the report, ``failed.parquet`` and the packer all
take the winners from here. ``compact`` rewrites the shards that hold rows which lost (and, when asked, rows of ids no
longer in the manifest), so that after a run any plain Parquet reader also sees one row per id. It works in two
phases: every rewritten shard is written (under a new name, see ``shards.shard_name``) before any old one is deleted,
and the new copies win over the old ones, so a compaction killed at any point leaves a ledger with the same winners,
and the next compaction finishes the job.

Reading a ledger of millions of rows: tasks read the key columns of a few shards each (``scan``) and hand the driver
about 25 bytes a row (key, digest, shard, position, status); the driver resolves the winners with NumPy.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.columns import current
from ddim_worker.failpoints import failpoint
from ddim_worker.job.shards import (
    EDITED_IMAGE,
    Shard,
    generation_order,
    list_shards,
    next_compaction,
    parquet_bytes,
    shard_name,
    shard_uris,
    table_keys,
)
from ddim_worker.job.tasks import map_chunks, objects
from ddim_worker.job.source import DoneSet, digest_number
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, FILTERED, OK, SKIPPED

log = logging.getLogger("ddim_edit.job")

#: Which of two rows of one id and one generation wins: a result beats "not run", and ok beats failed.
STATUS_RANK = {SKIPPED: 1, FAILED: 2, FILTERED: 3, OK: 4}

#: The ranks of finished rows: edited and recorded (a filtered row was scored and kept out of the dataset; a rerun
#: does not edit it again unless its inputs change).
FINISHED_RANKS = (STATUS_RANK[OK], STATUS_RANK[FILTERED])

#: The columns a scan reads of each shard (``input_digest`` and ``generation`` may be missing in old shards).
KEY_COLUMNS = ("id", "error_code", "manifest_row", "status", "input_digest")

#: Up to this many shards the driver reads the key columns itself: a Ray pass costs more than it saves.
LOCAL_SHARDS = 32

#: Shards smaller than this are read whole in one request (a footer read alone takes up to 64 KiB, and a request
#: costs more than the bytes it would save); larger ones by ranges, the footer and the columns wanted.
WHOLE_BELOW = 1 << 20


# -- reading one shard ---------------------------------------------------------------------------------------------

def read_shard(uri: str, storage_options: dict | None, columns: Iterable[str] | None = None,
               skip: Iterable[str] = ()) -> pa.Table:
    """One shard as a table (``columns`` present in it only, less ``skip``). Read by ranges: the footer, then only
    the chunks of those columns (a scan of shards with embedded PNGs must not fetch the PNGs)."""
    if columns is None and not skip:
        return pq.ParquetFile(pa.BufferReader(storage.read_bytes(uri, storage_options))).read()  # one whole GET
    with storage.open_read(uri, storage_options) as handle:
        small = handle.seek(0, 2) < WHOLE_BELOW
        handle.seek(0)
        parquet = pq.ParquetFile(pa.BufferReader(handle.read()) if small else handle, pre_buffer=True)
        names = parquet.schema_arrow.names
        wanted = [c for c in (names if columns is None else columns) if c in names and c not in set(skip)]
        return parquet.read(columns=wanted)


def shard_keys(uri: str, storage_options: dict | None) -> dict[str, np.ndarray]:
    """Per row of one shard: its ledger key, status rank, input digest (as a number) and position."""
    return shard_keys_of(read_shard(uri, storage_options, KEY_COLUMNS))


def _scan_task(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    parts = []
    for index, uri in zip(batch["index"], batch["uri"]):
        part = shard_keys(str(uri), storage_options)
        part["shard"] = np.full(len(part["key"]), int(index), np.int32)
        parts.append(part)
    return {name: np.concatenate([p[name] for p in parts]) for name in ("key", "status", "digest", "position",
                                                                          "shard")}


def map_shards(fn: Callable[..., dict[str, np.ndarray]], items: list[dict[str, Any]], use_ray: bool | None = None,
               **kwargs: Any) -> list[dict[str, np.ndarray]]:
    """``fn`` over per-shard ``items`` (``tasks.map_chunks``): up to ``LOCAL_SHARDS`` in this process."""
    return map_chunks(fn, items, use_ray, local_below=LOCAL_SHARDS, **kwargs)


def by_shard(shard: np.ndarray, *columns: np.ndarray) -> list[tuple[int, list[np.ndarray]]]:
    """(shard, its values of each of ``columns``) per shard present in ``shard``, rows in ``columns[0]`` order
    within each: one sort of the rows, not one pass over them per shard."""
    if not len(shard):
        return []
    order = np.lexsort((*reversed(columns), shard)) if columns else np.argsort(shard, kind="stable")
    shard = shard[order]
    cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
    parts = [np.split(c[order], cuts) for c in columns]
    return [(int(s), [p[k] for p in parts]) for k, s in enumerate(shard[np.r_[0, cuts]])]


# -- the index -----------------------------------------------------------------------------------------------------

@dataclass
class LedgerIndex:
    """Every row of every shard, by key, with the winner of each key marked."""

    shards: list[Shard]  # sorted by name; ``shard`` indexes this list
    key: np.ndarray  # uint64
    shard: np.ndarray  # int32
    position: np.ndarray  # int32, row within its shard
    status: np.ndarray  # int8, STATUS_RANK
    digest: np.ndarray  # uint64, input digest (0: not recorded)
    winner: np.ndarray  # bool

    @classmethod
    def build(cls, shards: list[Shard], parts: list[dict[str, np.ndarray]]) -> LedgerIndex:
        def column(name: str, dtype: Any) -> np.ndarray:
            return np.concatenate([p[name] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype)

        key, shard, position = column("key", np.uint64), column("shard", np.int32), column("position", np.int32)
        status, digest = column("status", np.int8), column("digest", np.uint64)
        ranks = {g: r for r, g in enumerate(sorted({s.generation for s in shards}, key=generation_order))}
        generation = np.array([ranks[s.generation] for s in shards], np.int32)[shard] if len(shard) else shard
        compaction = np.array([s.compaction for s in shards], np.int32)[shard] if len(shard) else shard
        order = np.lexsort((shard, compaction, status, generation, key))  # key, generation, status, compaction, name
        winner = np.zeros(len(key), bool)
        if len(key):
            sorted_keys = key[order]
            last = np.r_[sorted_keys[1:] != sorted_keys[:-1], True]
            winner[order[last]] = True
        return cls(shards, key, shard, position, status, digest, winner)

    @property
    def rows(self) -> int:
        return len(self.key)

    @property
    def superseded(self) -> int:
        return int((~self.winner).sum())

    def done(self) -> DoneSet:
        """The ids whose latest result is finished (ok or filtered), with the input digests they were made from."""
        mask = self.winner & np.isin(self.status, FINISHED_RANKS)
        order = np.argsort(self.key[mask], kind="stable")
        return DoneSet(self.key[mask][order], self.digest[mask][order])

    def states(self, keys: np.ndarray) -> np.ndarray:
        """The latest status rank of each of ``keys`` (0: no result at all)."""
        out = np.zeros(len(keys), np.int8)
        won_keys, won_status = self.key[self.winner], self.status[self.winner]
        if not len(won_keys):
            return out
        order = np.argsort(won_keys, kind="stable")
        won_keys, won_status = won_keys[order], won_status[order]
        where = np.searchsorted(won_keys, keys).clip(max=len(won_keys) - 1)
        found = won_keys[where] == keys
        out[found] = won_status[where[found]]
        return out

    def all_finished(self, keys: np.ndarray) -> bool:
        """Whether the latest result of every one of ``keys`` is finished (ok or filtered)."""
        return bool(np.isin(self.states(keys), FINISHED_RANKS).all())

    def counts(self, keys: np.ndarray) -> dict[str, int]:
        """ok / filtered / failed / skipped / missing over ``keys`` (the manifest's), from the winners."""
        states = self.states(keys)
        out = {status: int((states == rank).sum()) for status, rank in STATUS_RANK.items()}
        out["missing"] = int((states == 0).sum())
        return out

    def outside(self, keys: np.ndarray) -> np.ndarray:
        """Winners whose key is not among ``keys``: rows of ids this manifest no longer has (or not in this run)."""
        return self.winner & ~np.isin(self.key, keys)


def scan(layout: OutputLayout, storage_options: dict | None, use_ray: bool | None = None) -> LedgerIndex:
    """Read the key columns of every shard (on the cluster when there are many) and resolve the winners."""
    shards = sorted(list_shards(layout, storage_options), key=lambda s: s.name)
    uris = shard_uris(layout, shards)
    items = [{"index": i, "uri": uri} for i, uri in enumerate(uris)]
    parts = map_shards(_scan_task, items, use_ray, storage_options=storage_options or {})
    return LedgerIndex.build(shards, parts)


# -- compaction ----------------------------------------------------------------------------------------------------

@dataclass
class Compaction:
    """What one compaction pass does: per shard with a row to remove, the rows it keeps, and the sequence its new
    shards are named with (``shards.next_compaction``)."""

    sequence: int
    items: list[dict[str, Any]]  # uri, kind, generation, keep (positions)
    removed: int  # rows


def plan_compaction(layout: OutputLayout, index: LedgerIndex, storage_options: dict | None,
                    drop: np.ndarray | None = None) -> Compaction:
    """The shards to rewrite: those holding a row that lost (or a row ``drop`` marks)."""
    remove = ~index.winner if drop is None else (~index.winner | drop)
    if not remove.any():
        return Compaction(0, [], 0)
    listed = list_shards(layout, storage_options)  # the store now, besides the scan's listing: names never repeat
    sequence = next_compaction([*index.shards, *listed])
    items = []
    for s, (position, removed) in by_shard(index.shard, index.position, remove):
        if removed.any():
            shard = index.shards[s]
            items.append({"uri": shard_uris(layout, [shard])[0], "kind": shard.kind, "generation": shard.generation,
                          "keep": position[~removed].tolist()})
    return Compaction(sequence, items, int(remove.sum()))


def _compact_write_task(batch: dict[str, np.ndarray], layout: OutputLayout, sequence: int,
                        storage_options: dict) -> dict[str, np.ndarray]:
    written = []
    for uri, kind, generation, keep in zip(batch["uri"], batch["kind"], batch["generation"], batch["keep"]):
        keep = list(keep)
        if not keep:
            written.append("")
            continue
        table = read_shard(str(uri), storage_options).take(pa.array(keep, pa.int64()))
        name = shard_name(str(kind), str(generation), table_keys(table), sequence)
        storage.write_bytes(storage.join_uri(layout.results_folder, name), parquet_bytes(table), storage_options)
        written.append(name)
    return {"name": objects(written)}


def _compact_delete_task(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    for uri in batch["uri"]:
        storage.remove(str(uri), storage_options)
    return {"removed": np.ones(len(batch["uri"]), np.int64)}


def write_compacted(layout: OutputLayout, plan: Compaction, storage_options: dict | None) -> list[str]:
    """Phase 1: write every rewritten shard (the old ones stay, and lose to them). Returns the names written."""
    if not plan.items:
        return []
    parts = map_shards(_compact_write_task, plan.items, None, layout=layout,
                       sequence=plan.sequence, storage_options=storage_options or {})
    return [str(n) for part in parts for n in part["name"] if n]


def delete_compacted(plan: Compaction, storage_options: dict | None) -> None:
    """Phase 2, once phase 1 has written everything: delete the shards that were rewritten."""
    if plan.items:
        items = [{"uri": item["uri"]} for item in plan.items]
        map_shards(_compact_delete_task, items, None, storage_options=storage_options or {})


def compact(layout: OutputLayout, index: LedgerIndex, storage_options: dict | None,
            drop: np.ndarray | None = None) -> int:
    """Rewrite every shard holding a row that lost (or a row ``drop`` marks) with only its other rows; a shard left
    empty is deleted. Returns how many rows were removed. Safe to interrupt anywhere and to repeat: all new shards
    are written before any old one is deleted, and they outrank the old ones (their compaction sequence), so the
    ledger's winners stay the same, and the next compaction removes whatever copies are left."""
    plan = plan_compaction(layout, index, storage_options, drop)
    write_compacted(layout, plan, storage_options)
    failpoint("compaction_written")
    delete_compacted(plan, storage_options)
    return plan.removed


# -- reading the table ---------------------------------------------------------------------------------------------

def _with_generation(table: pa.Table, generation: str) -> pa.Table:
    """Shards written before rows carried their generation get it from their name."""
    if "generation" in table.column_names:
        return table
    return table.append_column("generation", pa.array([generation] * table.num_rows, pa.string()))


def read_table(layout: OutputLayout, storage_options: dict | None = None, keys: np.ndarray | None = None,
               images: bool = True) -> pa.Table:
    """The results as one table, one row per ledger key (the latest), in manifest order; ``keys`` keeps only those
    (a manifest's). For tests, tools and small jobs: it reads every shard in this process (the packer reads a large
    output on the cluster instead). ``images=False`` leaves ``edited_image`` out."""
    shards = sorted(list_shards(layout, storage_options), key=lambda s: s.name)
    tables, parts = [], []
    for i, (shard, uri) in enumerate(zip(shards, shard_uris(layout, shards))):
        table = _with_generation(read_shard(uri, storage_options, skip=() if images else [EDITED_IMAGE.name]),
                                 shard.generation)
        part = shard_keys_of(table)
        part["shard"] = np.full(table.num_rows, i, np.int32)
        tables.append(table)
        parts.append(part)
    if not tables:
        return current().results_schema.empty_table()
    index = LedgerIndex.build(shards, parts)
    mask = index.winner if keys is None else index.winner & np.isin(index.key, keys)
    table = pa.concat_tables(tables, promote_options="default").filter(pa.array(mask))
    return table.sort_by([("manifest_row", "ascending")])


def shard_keys_of(table: pa.Table) -> dict[str, np.ndarray]:
    """``shard_keys`` of a table already in memory."""
    n = table.num_rows
    digests = table.column("input_digest").to_pylist() if "input_digest" in table.column_names else [None] * n
    return {"key": np.array(table_keys(table), np.uint64),
            "status": np.array([STATUS_RANK.get(s, 0) for s in table.column("status").to_pylist()], np.int8),
            "digest": np.array([digest_number(d) for d in digests], np.uint64),
            "position": np.arange(n, dtype=np.int32)}


def sample_rows(layout: OutputLayout, index: LedgerIndex, storage_options: dict | None, fraction: float,
                keys: np.ndarray | None = None) -> list[dict]:
    """The winning rows whose key falls in the sample of ``fraction`` of all keys (``stages.in_sample``: the rows
    whose images the write stage kept for the report), among ``keys`` if given; read by Ray tasks when they are
    spread over many shards."""
    mask = index.winner & (index.key < np.uint64(min(fraction, 1.0) * (2**64 - 1)) if fraction < 1 else index.winner)
    if keys is not None:
        mask &= np.isin(index.key, keys)
    items = [{"uri": shard_uris(layout, [index.shards[s]])[0], "positions": positions.tolist()}
             for s, (positions,) in by_shard(index.shard[mask], index.position[mask])]
    parts = map_shards(_sample_task, items, None, storage_options=storage_options or {}) \
        if items else []
    rows = [row for part in parts for blob in part["rows"] for row in pickle.loads(blob)]
    return sorted(rows, key=lambda r: (r.get("manifest_row") is None, r.get("manifest_row") or 0))


def _sample_task(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    blobs = []
    for uri, positions in zip(batch["uri"], batch["positions"]):
        table = read_shard(str(uri), storage_options, skip=[EDITED_IMAGE.name])
        blobs.append(pickle.dumps(table.take(pa.array(list(positions), pa.int64())).to_pylist(), protocol=5))
    return {"rows": objects(blobs)}
