"""What a job leaves besides images and results shards: the failed rows' manifest and ``job.json``."""

from __future__ import annotations

import json
import shlex
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.job.config import ONE_SHOT, JobConfig
from ddim_worker.job.source import SourceContext
from ddim_worker.outputs import OutputLayout


def write_failed_manifest(config: JobConfig, source_ctx: SourceContext, failed: np.ndarray) -> str | None:
    """``failed.parquet``: the failed rows' manifest rows, their own columns untouched, to rerun only them.

    Ray tasks read the row groups that hold failed rows; the driver streams their batches into one file.
    """
    from ddim_worker.job.manifest_passes import failed_manifest_rows

    uri = OutputLayout(config.output).failed_manifest
    storage.remove(uri, config.storage_options)
    if not failed.any():
        return None
    sink = pa.BufferOutputStream()
    writer = None
    for batch in failed_manifest_rows(source_ctx, failed):
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        if writer is None:
            writer = pq.ParquetWriter(sink, table.schema)
        writer.write_table(table)
    if writer is None:
        return None
    writer.close()
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), config.storage_options)
    return uri


def write_job_record(config: JobConfig, summary: dict[str, Any]) -> str:
    uri = OutputLayout(config.output).job_record
    storage.write_bytes(uri, json.dumps(summary, indent=2, default=str).encode(), config.storage_options)
    return uri


def command_line(config: JobConfig) -> str:
    """The ``ddim-edit run`` command that runs this configuration: the options that differ from their defaults
    (credentials left out), so a dataset card can say how its data was made."""
    defaults = JobConfig(manifest=config.manifest, output=config.output).flat()
    parts = ["ddim-edit", "run", shlex.quote(str(config.manifest)), "--output", shlex.quote(str(config.output))]
    for name, value in config.flat().items():
        if name in ("manifest", "output", "storage_options") or value == defaults.get(name) or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, dict):
            parts += [flag, shlex.quote(json.dumps(value))]
        else:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def recorded_config(config: JobConfig) -> dict[str, Any]:
    """The configuration ``job.json`` records (``--config OUT/job.json`` reruns it): every option but credentials
    and the one-shot actions (``config.ONE_SHOT``)."""
    return {k: v for k, v in config.flat().items() if k != "storage_options" and k not in ONE_SHOT}


def mark_started(config: JobConfig, run_id: str, run: int) -> None:
    """A new run's first records: ``job.json`` says it is running (an earlier run's counts must not read as this
    run's if it fails), and the earlier ``failed.parquet`` goes (this run writes its own at the end)."""
    layout = OutputLayout(config.output)
    storage.remove(layout.failed_manifest, config.storage_options)
    write_job_record(config, {"state": "running", "run": run, "run_id": run_id, "config": recorded_config(config),
                              "versions": versions()})


def mark_failed(config: JobConfig, run_id: str, run: int, error: str) -> None:
    """``job.json`` of a run that failed before it could count anything."""
    write_job_record(config, {"state": "failed", "error": error, "run": run, "run_id": run_id,
                              "config": recorded_config(config), "versions": versions()})


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ddim-edit", "torch", "diffusers", "transformers", "ray", "pyarrow", "fsspec"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out
