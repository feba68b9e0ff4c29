"""What a job leaves besides images: the results table, the failed rows' manifest and ``job.json``."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.job.config import JobConfig
from ddim_worker.manifest import find_manifest_files
from ddim_worker.outputs import OutputLayout
from ddim_worker.rows import FAILED, results_table


def write_results(config: JobConfig, rows: list[dict]) -> str:
    uri = OutputLayout(config.output).results
    sink = pa.BufferOutputStream()
    pq.write_table(results_table(rows), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), config.storage_options)
    return uri


def write_failed_manifest(config: JobConfig, rows: list[dict]) -> str | None:
    """``failed.parquet``: the failed rows' manifest rows, same columns as the input, to rerun only them."""
    failed_rows = sorted(r["manifest_row"] for r in rows if r["status"] == FAILED and r.get("manifest_row") is not None)
    uri = OutputLayout(config.output).failed_manifest
    if not failed_rows:
        storage.remove(uri, config.storage_options)
        return None
    wanted = set(failed_rows)
    tables, offset = [], 0
    for file_uri in find_manifest_files(config.manifest, config.storage_options).files:
        with fsspec.open(file_uri, "rb", **config.storage_options) as handle:
            table = pq.read_table(handle)
        keep = [i for i in range(table.num_rows) if offset + i in wanted]
        offset += table.num_rows
        if keep:
            tables.append(table.take(keep))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.concat_tables(tables), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), config.storage_options)
    return uri


def write_job_record(config: JobConfig, summary: dict[str, Any]) -> str:
    uri = OutputLayout(config.output).job_record
    storage.write_bytes(uri, json.dumps(summary, indent=2, default=str).encode(), config.storage_options)
    return uri


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ddim-edit", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
