"""The edited dataset, packed: ``OUTPUT/dataset/data/train-NNNNN-of-MMMMM.parquet`` and a dataset card.

One row per ``ok`` manifest row: ``edited_image`` (the edited PNG as a Hugging Face ``Image`` value), the id, the
source image's reference, the prompts, every edit setting, and the manifest's own columns with their types.
``datasets.load_dataset("OUTPUT/dataset")`` gives a ``train`` split with PIL images; the folder is ready for
``huggingface-cli upload`` / ``HfApi.upload_folder``.

Files are sized by bytes (``--max-shard-size``, as ``datasets`` spells it: ``500MB``, ``100KB``, ``2GB``), row groups
by at most ``ROW_GROUP_BYTES``. Packing runs on the cluster, never through the driver's memory:

1. tasks read the ledger's shards and report, per shard, how many rows it packs and their bytes (the driver keeps
   one small record per shard, not per row);
2. the driver cuts the total into ``M = ceil(total / max_shard_size)`` equal byte ranges, one per file;
3. a task per file reads the shards overlapping its range (and the PNGs of those rows), and streams its file out,
   row group by row group.

Publishing is safe to crash and to fail. A packing writes its files into a folder of its own,
``dataset/data/<version>/`` (the version is a digest of what is packed), never over the files the card names; then it
switches the card, ``README.md``, whose ``configs`` name that folder: one small PUT, so a reader sees the old
dataset or the new one whole. Only after that are the folders of earlier packings removed. A packing killed or failed
before the switch leaves the previous dataset as it was (its unfinished folder is removed by the next packing), and
a data file is never published without its footer (``storage.open_write`` aborts the upload on an exception).
``dataset/.pack.json`` remembers what was packed, so a rerun that changed nothing does not pack again.
"""

from __future__ import annotations

import dataclasses

import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.columns import RESULT_SETTING_FIELDS, RowSchema, current
from ddim_worker.errors import root_cause
from ddim_worker.failpoints import failpoint
from ddim_worker.job import ledger

from ddim_worker.job.tasks import map_chunks, ray_running
from ddim_worker.job.shards import EDITED_IMAGE, generation_order, hf_features, shard_uris
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import OK

#: Largest row group: the Hub's dataset viewer reads row groups whole and wants them at most a few hundred MB.
ROW_GROUP_BYTES = 100 * 10**6

#: The region each edit changed (``--mask auto``), as an image column of the dataset when any packed row has one.
EDIT_MASK = pa.field("edit_mask", EDITED_IMAGE.type)


def dataset_columns(schema: RowSchema | None = None) -> tuple[str, ...]:
    """Our columns in the packed dataset, after ``edited_image``: what a user trains or filters on (``dataset=True``
    in the row schema)."""
    return (schema or current()).dataset_columns


def ledger_columns(schema: RowSchema | None = None) -> frozenset[str]:
    """Columns of the results that are ours (the job's bookkeeping, or dataset columns placed as ours), so not the
    manifest's own columns, which follow ours in the dataset."""
    return frozenset((schema or current()).results_schema.names) | {EDITED_IMAGE.name, EDIT_MASK.name}


class PackError(RuntimeError):
    """The dataset could not be packed (one clear message)."""


def data_file_name(index: int, count: int) -> str:
    return f"train-{index:05d}-of-{count:05d}.parquet"


_DATA_FILE = re.compile(r"^train-\d{5}-of-\d{5}\.parquet$")


# -- what one shard packs ------------------------------------------------------------------------------------------

def _packed_rows(table: pa.Table, positions: np.ndarray) -> pa.Table:
    return table.take(pa.array(np.sort(positions), pa.int64()))


def row_bytes(table: pa.Table) -> np.ndarray:
    """The bytes each row of a (packed) results table takes in the dataset: its PNG, and a little for the rest. The
    same function plans the files and fills them, so they agree on where each row goes."""
    n = table.num_rows
    if EDITED_IMAGE.name in table.column_names:
        embedded = [len(v["bytes"]) if v and v.get("bytes") else 0
                    for v in table.column(EDITED_IMAGE.name).to_pylist()]
    else:
        embedded = [0] * n
    recorded = table.column("image_bytes").to_pylist() if "image_bytes" in table.column_names else [0] * n
    ours, ledger_only = dataset_columns(), ledger_columns()
    kept = [c for c in table.column_names if c in ours or c not in ledger_only]  # what the file holds
    other = table.select(kept).nbytes // max(n, 1)
    return np.array([max(e, r or 0) + other for e, r in zip(embedded, recorded)], np.int64)


def _shard_task(batch: dict[str, np.ndarray], storage_options: dict) -> dict[str, np.ndarray]:
    """Per shard: rows it packs, their bytes, and where their images came from (counts by kind of source)."""
    out: dict[str, list] = {"index": [], "rows": [], "bytes": [], "sources": [], "masks": []}
    for index, uri, positions in zip(batch["index"], batch["uri"], batch["positions"]):
        table = _packed_rows(ledger.read_shard(str(uri), storage_options), np.asarray(positions, np.int64))
        out["index"].append(int(index))
        out["rows"].append(table.num_rows)
        out["bytes"].append(int(row_bytes(table).sum()))
        out["sources"].append(json.dumps(Counter(_source_kind(u) for u in table.column("image_url").to_pylist())))
        masks = table.column("mask_uri").to_pylist() if "mask_uri" in table.column_names else []
        out["masks"].append(sum(bool(m) for m in masks))
    return {"index": np.array(out["index"], np.int64), "rows": np.array(out["rows"], np.int64),
            "bytes": np.array(out["bytes"], np.int64), "sources": np.array(out["sources"], dtype=object),
            "masks": np.array(out["masks"], np.int64)}


def _source_kind(url: str | None) -> str:
    if not url:
        return "embedded in the manifest"
    scheme = url.split("://", 1)[0].lower() if "://" in url else "file"
    return {"http": "http(s)", "https": "http(s)", "file": "local files"}.get(scheme, f"{scheme}://")


# -- writing one file ----------------------------------------------------------------------------------------------

def dataset_schema(results: pa.Schema, masks: bool = False) -> pa.Schema:
    """``edited_image`` (and ``edit_mask`` when rows have masks), our columns, then the manifest's own columns
    (every results column that is not ours)."""
    rows = current()
    carried = [f for f in results if f.name not in ledger_columns(rows)]
    ours = [rows.results_schema.field(name) for name in dataset_columns(rows)]
    schema = pa.schema([EDITED_IMAGE, *([EDIT_MASK] if masks else []), *ours, *carried])
    return schema.with_metadata({"huggingface": json.dumps({"info": {"features": hf_features(schema)}})})


def _dataset_rows(table: pa.Table, schema: pa.Schema, storage_options: dict) -> pa.Table:
    """Packed results rows as dataset rows: the PNG bytes from the shard (embedded) or from ``images/``."""
    embedded = (table.column(EDITED_IMAGE.name).to_pylist() if EDITED_IMAGE.name in table.column_names
                else [None] * table.num_rows)
    images = []
    for rid, uri, value in zip(table.column("id").to_pylist(), table.column("output_uri").to_pylist(), embedded):
        data = value["bytes"] if value and value.get("bytes") else None
        if data is None:
            if not uri:
                raise PackError(f"row {rid!r} is ok but its edited image is neither in the results nor saved")
            data = storage.read_bytes(uri, storage_options)
        images.append({"bytes": data, "path": f"{rid}.png"})
    columns = {EDITED_IMAGE.name: pa.array(images, EDITED_IMAGE.type)}
    if EDIT_MASK.name in schema.names:
        masks = [{"bytes": storage.read_bytes(uri, storage_options), "path": f"{rid}-mask.png"} if uri else None
                 for rid, uri in zip(table.column("id").to_pylist(), table.column("mask_uri").to_pylist())]
        columns[EDIT_MASK.name] = pa.array(masks, EDIT_MASK.type)
    for f in schema:
        if f.name not in columns:
            columns[f.name] = table.column(f.name).cast(f.type) if f.name in table.column_names \
                else pa.nulls(table.num_rows, f.type)
    return pa.table(columns, schema=schema)


def _file_task(batch: dict[str, np.ndarray], folder: str, schema: pa.Schema,
               storage_options: dict) -> dict[str, np.ndarray]:
    """Write one dataset file: the rows whose byte offset falls in [lo, hi), streamed row group by row group."""
    written = []
    for name, lo, hi, parts in zip(batch["name"], batch["lo"], batch["hi"], [json.loads(p) for p in batch["parts"]]):
        rows, size = 0, 0
        with storage.open_write(storage.join_uri(folder, str(name)), storage_options) as handle:
            writer = pq.ParquetWriter(handle, schema)
            pending: list[pa.Table] = []
            pending_bytes = 0
            for uri, start, positions in parts:
                table = _packed_rows(ledger.read_shard(str(uri), storage_options), np.asarray(positions, np.int64))
                sizes = row_bytes(table)
                offsets = int(start) + np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
                mine = np.flatnonzero((offsets >= int(lo)) & (offsets < int(hi)))
                for k in range(0, len(mine), 64):  # a few PNGs in memory at a time, not a whole shard's
                    chunk = _dataset_rows(table.take(pa.array(mine[k:k + 64], pa.int64())), schema, storage_options)
                    pending.append(chunk)
                    pending_bytes += int(sizes[mine[k:k + 64]].sum())
                    rows += chunk.num_rows
                    if pending_bytes >= ROW_GROUP_BYTES:
                        writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
                        pending, pending_bytes = [], 0
                    failpoint("pack_rows_written")  # a file half written: its upload must not become visible
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=1 << 30)
            writer.close()
            size = handle.tell()
        written.append((rows, size))
    return {"rows": np.array([r for r, _ in written], np.int64), "bytes": np.array([b for _, b in written], np.int64)}


# -- the whole packing -------------------------------------------------------------------------------------------

@dataclass
class PackResult:
    rows: int
    files: int
    bytes: int
    data_files: list[str]
    card: str
    skipped: bool = False  # nothing changed since the last packing

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "files": self.files, "bytes": self.bytes, "card": self.card,
                "unchanged": self.skipped}


@dataclass
class _Survey:
    """What step 1 learns per shard: where its packed rows start in the byte order, and the totals."""

    items: list[dict[str, Any]]  # per shard: index, uri, positions
    counts: dict[int, tuple[int, int]]  # shard index -> (rows, bytes)
    sources: Counter
    with_masks: bool

    @property
    def rows(self) -> int:
        return sum(r for r, _ in self.counts.values())

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.counts.values())


def _survey(layout: OutputLayout, index: ledger.LedgerIndex, mask: np.ndarray, options: dict) -> _Survey:
    """1. Per shard (Ray tasks): the rows it packs, their bytes, their sources, whether they have masks."""
    items = [{"index": s, "uri": shard_uris(layout, [index.shards[s]])[0], "positions": positions.tolist()}
             for s, (positions,) in ledger.by_shard(index.shard[mask], index.position[mask])]
    per_shard = ledger.map_shards(_shard_task, items, storage_options=options)
    counts = {int(i): (int(r), int(b)) for part in per_shard
              for i, r, b in zip(part["index"], part["rows"], part["bytes"])}
    sources: Counter = Counter()
    for part in per_shard:
        for text in part["sources"]:
            sources.update(json.loads(text))
    return _Survey(items, counts, sources, any(int(m) for part in per_shard for m in part["masks"]))


def _file_plans(survey: _Survey, max_shard_size: int) -> list[dict[str, Any]]:
    """2. The files: equal byte ranges of the rows in shard order, each under ``max_shard_size``."""
    total = survey.bytes
    files = max(1, math.ceil(total / max_shard_size))
    starts, offset = {}, 0
    for item in survey.items:
        starts[item["index"]] = offset
        offset += survey.counts[item["index"]][1]
    bounds = [round(k * total / files) for k in range(files + 1)]
    plans = []
    for k in range(files):
        lo, hi = bounds[k], bounds[k + 1] if k + 1 < files else total + 1
        parts = [(item["uri"], starts[item["index"]], item["positions"]) for item in survey.items
                 if starts[item["index"]] < hi and starts[item["index"]] + survey.counts[item["index"]][1] > lo]
        plans.append({"name": data_file_name(k, files), "lo": lo, "hi": hi, "parts": json.dumps(parts)})
    return plans


def _write_files(plans: list[dict[str, Any]], folder: str, schema: pa.Schema, options: dict,
                 planned_rows: int) -> tuple[int, int]:
    """3. Every file, one Ray task each, into ``folder``; (rows, bytes) written."""
    try:
        written = map_chunks(_file_task, plans, ray_running(), per_task=1, folder=folder, schema=schema,
                             storage_options=options)
    except (OSError, PackError):
        raise
    except Exception as exc:  # noqa: BLE001 - a task's error, as Ray wraps it: one line
        raise PackError(f"writing the data files failed: {root_cause(exc)}") from exc
    rows = sum(int(r) for part in written for r in part["rows"])
    if rows != planned_rows:
        raise PackError(f"packed {rows} rows, planned {planned_rows}: the results changed while packing")
    return rows, sum(int(b) for part in written for b in part["bytes"])


def pack(layout: OutputLayout, manifest_keys: np.ndarray, storage_options: dict | None, max_shard_size: int,
         card: dict[str, Any], index: ledger.LedgerIndex | None = None,
         guard: Callable[[], None] | None = None) -> PackResult:
    """Pack the ``ok`` winners of ``manifest_keys`` (sorted) into ``OUTPUT/dataset``; ``card`` describes the run.
    ``guard`` is called before the card is switched and before old files are removed (the driver's lease check)."""
    options = storage_options or {}
    guard = guard or (lambda: None)
    index = index or ledger.scan(layout, options)
    mask = index.winner & (index.status == ledger.STATUS_RANK[OK]) & np.isin(index.key, manifest_keys)
    version = hashlib.sha256(json.dumps([[s.name for s in index.shards], int(mask.sum()), max_shard_size,
                                         manifest_keys_digest(manifest_keys)]).encode()).hexdigest()[:16]
    record_uri = storage.join_uri(layout.dataset_folder, ".pack.json")
    previous = _read_json(record_uri, options)
    if previous and previous.get("version") == version and previous.get("card") == card.get("fingerprint"):
        return PackResult(previous["rows"], previous["files"], previous["bytes"], previous["data_files"],
                          storage.join_uri(layout.dataset_folder, "README.md"), skipped=True)
    survey = _survey(layout, index, mask, options)
    plans = _file_plans(survey, max_shard_size)
    schema = dataset_schema(_results_schema(layout, index, options), survey.with_masks)
    # into this packing's own folder: never over the files the card names now
    rows, size = _write_files(plans, layout.dataset_version(version), schema, options, survey.rows)
    names = [f"data/{version}/{p['name']}" for p in plans]

    # 4. switch: the card names the new folder (one PUT); then the record; then earlier packings' files go
    guard()
    failpoint("pack_before_switch")
    card_uri = storage.join_uri(layout.dataset_folder, "README.md")
    text = dataset_card(schema, rows, len(plans), size, survey.sources, card, version)
    storage.write_bytes(card_uri, text.encode(), options)
    storage.write_bytes(record_uri, json.dumps({"version": version, "card": card.get("fingerprint"), "rows": rows,
                                                "files": len(plans), "bytes": size, "data_files": names}).encode(),
                        options)
    guard()
    remove_other_packings(layout, version, options)
    return PackResult(rows, len(plans), size, names, card_uri)


def remove_other_packings(layout: OutputLayout, version: str, options: dict) -> None:
    """Every data file but the current packing's: earlier packings, and folders of packings that never finished."""
    for name in storage.list_folders(layout.dataset_data, options):
        if name != version:
            storage.remove_tree(layout.dataset_version(name), options)
    for name in storage.list_names(layout.dataset_data, options, suffix=".parquet"):
        if _DATA_FILE.match(name):  # the flat layout of packings before versioned folders
            storage.remove(storage.join_uri(layout.dataset_data, name), options)


def current_data_files(layout: OutputLayout, storage_options: dict | None = None) -> list[str]:
    """The data files of the dataset the card names now (what ``datasets`` loads), as URIs."""
    record = _read_json(storage.join_uri(layout.dataset_folder, ".pack.json"), storage_options or {}) or {}
    return [storage.join_uri(layout.dataset_folder, name) for name in record.get("data_files", [])]


def card_facts(config: Any, *, model_revision: str | None, fingerprint: str | None, dtype: Any, failed: int,
               skipped: int, command: str, version: str, filtered: int = 0,
               scorer_fingerprint: str | None = None) -> dict[str, Any]:
    """What the dataset card says about the run that made the dataset (``config``: its ``JobConfig``). Its
    ``fingerprint`` (everything but the command and the date) tells whether a packing is still current."""
    card = {"title": f"edits of {config.manifest}", "manifest": config.manifest, "model": config.model,
            "model_revision": model_revision, "model_fingerprint": fingerprint, "size": config.engine.size,
            "dtype": dtype, "settings": config.edit.as_dict(), "version": version, "failed": failed,
            "skipped": skipped, "filtered": filtered}
    if config.scorer:
        card["scorer"] = {"model": config.scorer, "fingerprint": scorer_fingerprint,
                          "thresholds": dataclasses.asdict(config.thresholds())}
    card["fingerprint"] = json.dumps(card, sort_keys=True, default=str)
    card["command"] = command
    card["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return card


def manifest_keys_digest(keys: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(keys, np.uint64).tobytes()).hexdigest()[:16]


def _results_schema(layout: OutputLayout, index: ledger.LedgerIndex, options: dict) -> pa.Schema:
    """The schema of the results (the newest shard's): the manifest's own columns with their types."""
    if not index.shards:
        return current().results_schema
    newest = max(index.shards, key=lambda s: (generation_order(s.generation), s.compaction, s.name))
    with storage.open_read(shard_uris(layout, [newest])[0], options) as handle:
        return pq.read_schema(handle)  # the footer only, not the shard's images


def _read_json(uri: str, options: dict) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri, options))
    except (FileNotFoundError, OSError, ValueError):
        return None


# -- the dataset card ----------------------------------------------------------------------------------------------

def _filtered_note(card: dict) -> str:
    return f" and passed the scorer; {card.get('filtered', 0):,} filtered," if card.get("scorer") else ""


def _scorer_note(card: dict) -> str:
    """The card's line on the filter: which CLIP model scored the candidates and what a kept edit reached."""
    scorer = card.get("scorer")
    if not scorer:
        return ""
    limits = scorer.get("thresholds", {})
    return (f"\n- **Filter**: each row's candidates were scored by the CLIP model {_code(scorer.get('model'))} "
            f"(fingerprint {_code(scorer.get('fingerprint') or '-')}); a kept edit reached directional similarity "
            f">= {limits.get('direction')}, image similarity >= {limits.get('image_similarity')} and text "
            f"similarity >= {limits.get('text_similarity')} (columns `score`, `clip_image_similarity`, "
            f"`clip_text_similarity`).")


def _yaml_features(schema: pa.Schema) -> list[dict]:
    features = hf_features(schema)
    try:
        import datasets

        return datasets.Features.from_dict(features)._to_yaml_list()
    except Exception:  # noqa: BLE001 - without datasets: the scalar types we write
        return [{"name": name, "dtype": "image" if spec.get("_type") == "Image" else spec.get("dtype", "string")}
                for name, spec in features.items()]


def _code(text: Any, in_table: bool = False) -> str:
    """``text`` as Markdown inline code whatever it holds: delimited by more backticks than its longest run (padded
    when it starts or ends with one), line breaks as spaces, and ``|`` escaped in a table cell (GFM splits cells
    on it even inside code)."""
    text = " ".join(str(text).splitlines())
    ticks = "`" * (_longest_backtick_run(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    code = f"{ticks}{pad}{text}{pad}{ticks}"
    return code.replace("|", "\\|") if in_table else code


def _fenced(text: str, info: str = "") -> str:
    """``text`` in a fenced code block whose fence is longer than any backtick run inside it, so nothing in it (a
    command with ``` in an argument) can close the block early."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def dataset_card(schema: pa.Schema, rows: int, files: int, size: int, sources: Counter, card: dict[str, Any],
                 version: str) -> str:
    """``README.md``: a YAML header (configs pointing at the data files, the features, the split's size) the Hub and
    ``datasets`` read, and a body that says how the dataset was made."""
    import yaml

    header = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": f"data/{version}/train-*"}]}],
        "dataset_info": {"features": _yaml_features(schema),
                         "splits": [{"name": "train", "num_bytes": size, "num_examples": rows}],
                         "download_size": size, "dataset_size": size},
        "tags": ["image-editing", "ddim-inversion", "synthetic"],
    }
    settings = "\n".join(f"| {_code(k, True)} | {_code(v, True)} |" for k, v in card.get("settings", {}).items())
    source_lines = "\n".join(f"- {n:,} rows: {kind}" for kind, n in sorted(sources.items())) or "- none"
    own = [f.name for f in schema if f.name not in ledger_columns()]
    body = f"""
# Edited images: {card.get("title", "a ddim-edit run")}

Each row is an image edited with DDIM inversion: the source image was encoded, inverted under its source prompt,
then sampled again under its edit prompt, so what the edit prompt names changes and the rest is kept.

- **Rows**: {rows:,} (one per manifest row that was edited{_filtered_note(card)}; {card.get("failed", 0):,} failed and
  {card.get("skipped", 0):,} not run are in the job's results, not here), in {files} Parquet file(s), {size:,} bytes.{_scorer_note(card)}
- **Columns**: `edited_image` (PNG){", `edit_mask` (the region each edit changed, 255 inside)" if EDIT_MASK.name in schema.names else ""}, `id`, `image_url` (the source image), `source_prompt`, `edit_prompt`, every edit
  setting ({", ".join(_code(n) for n in RESULT_SETTING_FIELDS)}){", and the manifest's own columns: " + ", ".join(_code(c) for c in own) if own else ""}.
- **Model**: {_code(card.get("model"))}, revision {_code(card.get("model_revision") or "-")}, fingerprint
  {_code(card.get("model_fingerprint"))}; working size {card.get("size")} px, dtype {card.get("dtype")}.
- **Made**: {card.get("date") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} with ddim-edit
  {card.get("version", "")}, by

{_fenced(str(card.get("command", "")), "sh")}

- **Source images**, from the manifest {_code(card.get("manifest"))}:
{source_lines}

## Settings (the job's defaults; a row's own are in its columns)

| setting | value |
|---|---|
{settings}

## Loading

```python
import datasets
ds = datasets.load_dataset("path/to/this/folder", split="train")   # or the Hub repository it is uploaded to
ds[0]["edited_image"]                                              # a PIL image
```
"""
    return "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n" + body.lstrip("\n")
