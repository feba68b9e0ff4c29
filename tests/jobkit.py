"""Helpers shared by the job tests: images, manifests, running the job in-process, reading its outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ddim_worker import storage
from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job
from ddim_worker.job.ledger import read_table
from ddim_worker.outputs import OutputLayout
from ddim_worker.synthetic import picture_bytes

#: Small settings so a job over a few rows takes seconds on 2 CPU cores.
FAST = dict(size=64, num_steps=6, start_step=2, batch_size=4)


def picture(seed: int, size: int = 80, fmt: str = "PNG") -> bytes:
    """A deterministic synthetic picture (``ddim_worker.synthetic``), distinct per seed, encoded as ``fmt``."""
    return picture_bytes(seed, size, fmt)


def write_manifest(rows: list[dict], uri: str, storage_options: dict | None = None,
                   schema: pa.Schema | None = None) -> str:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink)
    storage.write_bytes(uri, sink.getvalue().to_pybytes(), storage_options)
    return uri


def run(manifest: str, output: str, model: Path, **overrides: Any) -> dict:
    """The job in-process; options by their flat names (``num_steps``, ``batch_size``, ``storage_options``...)."""
    options = {**FAST, **overrides}
    return run_job(JobConfig.from_flat({"manifest": manifest, "output": output, "model": str(model), **options}))


def engine_actors_started() -> int:
    """Engine actors the session's Ray has started so far (alive or dead), by the state API."""
    import ray
    from ray.util.state import list_actors

    actors = list_actors(address=ray.get_runtime_context().gcs_address, limit=10_000, raise_on_missing_output=False)
    return sum("EditActor" in a.class_name for a in actors)


def png_path(output: Path | str, row_id: str, kind: str = "edited") -> Path:
    """Where the job writes a row's image of ``kind`` under a local output (``outputs.OutputLayout``'s rule)."""
    return Path(OutputLayout(str(output)).image(kind, row_id))


def result_rows(output: str, storage_options: dict | None = None) -> list[dict]:
    """The results table as a reader sees it (every shard of ``results/``), in manifest order."""
    table = read_table(OutputLayout(output), storage_options, images=False)
    return sorted(table.to_pylist(), key=lambda r: r["manifest_row"])


def results(output: str, storage_options: dict | None = None) -> dict[str, dict]:
    """Results by id; an id appears once, except on rows that failed as a duplicate of an earlier row."""
    rows = [r for r in result_rows(output, storage_options) if r["error_code"] != "duplicate_id"]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"an id appears twice in the results: {ids}"
    return {r["id"]: r for r in rows}


def run_script(name: str, *args: str, timeout: float = 600) -> tuple[dict, str]:
    """Run ``tests/scripts/<name>`` (its own Ray, apart from the session's) and parse the JSON line it prints last;
    also returns its stderr (the job's log)."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(repo / "tests" / "scripts" / name), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1]), proc.stderr
