"""Run a job on a Ray cluster where one of two engine nodes cannot load the model (ray.cluster_utils).

Run as a subprocess by tests/test_faults.py (its own Ray cluster, apart from the test session's). The model lives in
an object store, so every engine node copies it to its model cache first; the bad node's cache folder cannot be
created (as on a node with a broken disk), so every actor there fails to start, again and again, while the good
node's actor edits. Prints one JSON line.

    bad_node.py MANIFEST OUTPUT MODEL_URI STORAGE_OPTIONS_JSON CACHE_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.cluster_utils import Cluster

from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job


def main(manifest: str, output: str, model: str, storage_options: str, cache: str) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": False,
                                                            "object_store_memory": 150 * 2**20})
    cluster.add_node(num_cpus=1, resources={"engine": 1}, object_store_memory=150 * 2**20,
                     env_vars={"DDIM_EDIT_MODEL_CACHE": cache})
    cluster.add_node(num_cpus=1, resources={"engine": 1}, object_store_memory=150 * 2**20,
                     env_vars={"DDIM_EDIT_MODEL_CACHE": "/dev/null/no-cache-here"})
    ray.init(address=cluster.address)
    report: dict = {"error": None}
    started = time.monotonic()
    try:
        config = JobConfig.from_flat(dict(manifest=manifest, output=output, model=model, size=64, num_steps=4,
                                          start_step=1, batch_size=2, calls_per_task=1, actors=2,
                                          engine_resources={"engine": 1}, report=False,
                                          storage_options=json.loads(storage_options)))
        report["summary"] = run_job(config)
    except BaseException as exc:  # reported in the JSON line
        report["error"] = repr(exc)
    finally:
        report["seconds"] = time.monotonic() - started
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:6])
