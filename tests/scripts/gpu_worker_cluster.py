"""Run a job on Ray clusters whose head has no GPU and whose worker node says it has GPUs (ray.cluster_utils).

Run as a subprocess by tests/test_dataset_scale.py (its own Ray clusters, apart from the test session's). The
worker's GPUs are only Ray resources: torch there sees no CUDA, so the engine actors run on its CPU in fp32, and the
job must say so (the dtype the actors ran), not what the driver's own torch would guess. Two runs:

1. a worker with 2 GPUs, no --actors: the pool takes both (job.json: "actors": 2, its config without the figure);
2. a worker with 1 GPU, rerun from the first run's job.json (--config OUT/job.json --overwrite): one actor.

Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.cluster_utils import Cluster

from ddim_worker.job.args import parse_args
from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job


def _on_cluster(gpus: int, config: JobConfig) -> dict:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                            "include_dashboard": False,
                                                            "object_store_memory": 200 * 2**20})
    cluster.add_node(num_cpus=2, num_gpus=gpus, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address)
    try:
        return run_job(config)
    finally:
        ray.shutdown()
        cluster.shutdown()


def main(manifest: str, output: str, model: str) -> None:
    report: dict = {"error": None}
    try:
        # gpus_per_actor and actors left to their defaults: decided from the cluster's resources.
        first = JobConfig.from_flat(dict(manifest=manifest, output=output, model=model, size=64, num_steps=4,
                                         start_step=1, batch_size=2, calls_per_task=1, report=False))
        report["two_gpus"] = _on_cluster(2, first)
        again = parse_args(["--config", str(Path(output) / "job.json"), "--overwrite"])
        report["one_gpu"] = _on_cluster(1, again)
    except BaseException as exc:  # reported in the JSON line
        report["error"] = repr(exc)
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:4])
