"""Run a job on a Ray cluster whose head has no GPU and whose worker node says it has one (ray.cluster_utils).

Run as a subprocess by tests/test_dataset_scale.py (its own Ray cluster, apart from the test session's). The worker's
"GPU" is only a Ray resource: torch there sees no CUDA, so the engine actor runs on its CPU in fp32, and the job
must say so (the dtype the actor ran), not what the driver's own torch would guess. Prints one JSON line.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.cluster_utils import Cluster

from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job


def main(manifest: str, output: str, model: str) -> None:
    with socket.socket() as probe:  # the default dashboard port may be taken by another Ray on this machine
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0,
                                                            "include_dashboard": True,
                                                            "dashboard_port": dashboard_port,
                                                            "object_store_memory": 200 * 2**20})
    cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address)
    report: dict = {"error": None}
    try:
        # gpus_per_actor left to its default: decided from the cluster's resources, not the driver's torch.
        config = JobConfig.from_flat(dict(manifest=manifest, output=output, model=model, size=64, num_steps=4,
                                          start_step=1, batch_size=2))
        report["summary"] = run_job(config)
    except BaseException as exc:  # reported in the JSON line
        report["error"] = repr(exc)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:4])
