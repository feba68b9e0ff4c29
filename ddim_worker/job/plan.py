"""Planning a job in the driver: which rows run, which fail up front, which are already done.

Rows that share an image and inversion settings are put next to each other, so they land in one engine batch and
the engine inverts them once (augmentation: one image, many edit prompts).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.job.config import JobConfig
from ddim_worker.manifest import ManifestFiles, parse_column_map, read_rows, row_id, row_settings
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, SKIPPED, RowError


@dataclass
class Plan:
    work: list[dict]  # rows to compute, grouped so rows sharing an inversion are neighbours
    finished: list[dict]  # result rows decided by the driver: invalid rows (failed) and done rows (skipped)
    total: int
    image_column: str | None
    manifest: ManifestFiles


def previous_results(config: JobConfig) -> dict[str, dict]:
    """The last run's result rows by id (empty when there is none)."""
    try:
        data = storage.read_bytes(OutputLayout(config.output).results, config.storage_options)
    except (FileNotFoundError, OSError):
        return {}
    table = pq.read_table(pa.BufferReader(data))
    return {row["id"]: row for row in table.to_pylist()}


def _inversion_order(row: dict) -> tuple:
    return (str(row["image_url"] or ""), row["ref_file"], row["ref_group"], row["ref_row"], row["source_prompt"],
            row["negative_prompt"], row["num_steps"], row["inversion_guidance"], row["inversion"], row["manifest_row"])


def plan_rows(config: JobConfig) -> Plan:
    layout = OutputLayout(config.output, config.latent_cache)
    mapping = parse_column_map(config.columns)
    records, manifest, columns = read_rows(config.manifest, mapping, config.storage_options, config.limit)
    done_ids = set() if config.overwrite else {
        name.removesuffix(".png")
        for name in storage.list_names(layout.folder("edited"), config.storage_options, suffix=".png")
    }
    previous = previous_results(config) if done_ids else {}
    seen: dict[str, int] = {}
    work, finished = [], []
    for record in records:
        result = {k: record.get(k) for k in ("image_url", "source_prompt", "edit_prompt", "negative_prompt")}
        result["manifest_row"] = record["manifest_row"]
        try:
            if "row_error" in record:
                raise RowError(*record["row_error"])
            settings = row_settings(record, config.edit, config.max_prompt_chars)
            rid = row_id(record)
        except RowError as exc:
            rid = str(record.get("id")) if record.get("id") is not None else None
            finished.append({**result, "id": rid, "status": FAILED, "error_code": exc.code, "error": exc.message})
            continue
        result.update(settings, id=rid)
        if rid in seen:
            finished.append({**result, "status": FAILED, "error_code": "duplicate_id",
                             "error": f"id {rid!r} is also manifest row {seen[rid]}; ids must be unique"})
            continue
        seen[rid] = record["manifest_row"]
        if rid in done_ids:
            before = previous.get(rid, {})
            finished.append({**before, **result, "status": SKIPPED, "error_code": None, "error": None,
                             "output_uri": layout.edited(rid), "seconds": 0.0, "inversion_passes": 0,
                             "sampling_passes": 0, "unet_passes": 0})
            continue
        ref = record.get("image_ref") or (-1, -1, -1)
        work.append({**result, "image_url": record.get("image_url"), "ref_file": ref[0], "ref_group": ref[1],
                     "ref_row": ref[2]})
    work.sort(key=_inversion_order)
    return Plan(work, finished, len(records), columns.get("image"), manifest)
