"""A job on a Ray instance of 2 logical CPUs, with a row group bigger than one read slice.

Run as a subprocess by tests/test_dataset_scale.py. On such a node the reading task (paused on backpressure) and the
engine actor once held both CPU slots, so fetching never started and the stream stalled. Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job
from ddim_worker.job.source import READ_SLICE_ROWS


def main(folder: str, model: str) -> None:
    root = Path(folder)
    rows = READ_SLICE_ROWS + 2000  # one row group, two read slices: the reading task pauses after the first
    table = pa.table({"id": [f"r{i}" for i in range(rows)],
                      "image_url": ["missing.png"] * (rows - 4) + ["a.png"] * 4,  # most fail fast, 4 are edited
                      "source_prompt": ["a"] * rows, "edit_prompt": [f"b {i}" for i in range(rows)]})
    pq.write_table(table, root / "m.parquet", row_group_size=rows)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    started = time.monotonic()
    summary = run_job(JobConfig.from_flat(dict(manifest=str(root / "m.parquet"), output=str(root / "out"),
                                               model=model, size=64, num_steps=2, start_step=1, batch_size=64,
                                               report=False, results_shard_rows=2048)))
    print(json.dumps({"counts": summary["counts"], "seconds": time.monotonic() - started}))
    ray.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
