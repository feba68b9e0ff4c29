"""Passes over the whole manifest by Ray tasks, for the driver: id hashes of every row, the full ids of a few rows,
and the manifest's own rows of the failed ones. The driver keeps a few bytes a row, never the rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from ddim_worker.job.source import SourceContext, index_groups
from ddim_worker.job.tasks import descriptor_dataset



def index_manifest(source_ctx: SourceContext) -> tuple[np.ndarray, np.ndarray]:
    """(manifest rows, id hashes) of the whole manifest, computed by Ray tasks; 16 bytes a row in the driver."""
    source = source_ctx.source
    rows = np.zeros(source.total_rows, np.int64)
    hashes = np.zeros(source.total_rows, np.uint64)
    ds = descriptor_dataset(source.descriptors())
    ds = ds.map_batches(index_groups, fn_kwargs={"ctx": source_ctx}, batch_size=1, batch_format="numpy")
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        where = batch["manifest_row"]
        rows[where], hashes[where] = where, batch["id_hash"]
    return rows, hashes


def ids_of_rows(source_ctx: SourceContext, rows: list[int]) -> dict[int, str | None]:
    """The full ids of a few manifest rows (the first rows of repeated id hashes), read by Ray tasks."""
    wanted = np.array(sorted(rows), np.int64)
    ds = descriptor_dataset([g for g in source_ctx.source.descriptors()
                             if ((wanted >= g["first_row"]) & (wanted < g["first_row"] + g["rows"])).any()])
    ds = ds.map_batches(_ids_of_rows, fn_kwargs={"ctx": source_ctx, "wanted": wanted}, batch_size=1,
                        batch_format="numpy")
    out: dict[int, str | None] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        out.update({int(r): (str(i) if i else None) for r, i in zip(batch["manifest_row"], batch["id"])})
    return out


def _ids_of_rows(batch: dict[str, np.ndarray], ctx: SourceContext, wanted: np.ndarray) -> dict[str, np.ndarray]:
    from ddim_worker.job.source import _groups, parse_rows, read_group

    rows, ids = [], []
    for group in _groups(batch):
        for row in parse_rows(ctx.source, read_group(ctx.source, group), group.first_row, ctx.defaults,
                              ctx.max_prompt_chars):
            if row.manifest_row in wanted:
                rows.append(row.manifest_row)
                ids.append(row.id or "")
    return {"manifest_row": np.array(rows, np.int64), "id": np.array(ids, dtype=object)}


def failed_manifest_rows(source_ctx: SourceContext, failed: np.ndarray):
    """The manifest's own rows (its columns, untouched) whose bit is set in ``failed``, as pyarrow batches."""
    import ray

    groups = [g for g in source_ctx.source.descriptors()
              if failed[g["first_row"]:g["first_row"] + g["rows"]].any()]
    if not groups:
        return
    ref = ray.put(failed)
    ds = descriptor_dataset(groups)
    ds = ds.map_batches(_failed_rows, fn_kwargs={"source": source_ctx.source, "failed": ref}, batch_size=1,
                        batch_format="pyarrow")
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")


def _failed_rows(batch: Any, source: Any, failed: Any) -> Any:
    import ray

    from ddim_worker.job.source import RowGroup, read_group

    failed = ray.get(failed) if type(failed).__name__ == "ObjectRef" else failed
    tables = []
    for g in batch.to_pylist():
        group = RowGroup(int(g["file"]), int(g["group"]), int(g["first_row"]), int(g["rows"]))
        table = read_group(source, group)
        tables.append(table.filter(pa.array(failed[group.first_row:group.first_row + group.rows])))
    return pa.concat_tables(tables)
