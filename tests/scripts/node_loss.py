"""Run a job on a two-node Ray cluster (ray.cluster_utils.Cluster) and remove the worker node mid-job.

Run as a subprocess by tests/test_faults.py (its own Ray cluster, apart from the test session's). Prints one JSON line.
Ray Data alone aborts the dataset when the node dies; the driver re-runs the unfinished rows through the resume path.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job


def main(manifest: str, output: str, model: str) -> None:
    # One "engine_slot" per node and two actors: one engine actor lands on each node. The head keeps enough CPUs
    # for the fetch/write tasks and the surviving actor once the worker is gone.
    with socket.socket() as probe:  # the default dashboard port may be taken by another Ray on this machine
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "resources": {"engine_slot": 1},
                                                            "include_dashboard": True,
                                                            "dashboard_port": dashboard_port,
                                                            "object_store_memory": 200 * 2**20})
    worker = cluster.add_node(num_cpus=2, resources={"engine_slot": 1}, object_store_memory=200 * 2**20)
    ray.init(address=cluster.address)
    box: dict = {}

    def job() -> None:
        try:
            box["summary"] = run_job(JobConfig.from_flat(dict(
                manifest=manifest, output=output, model=model, size=64, num_steps=24, start_step=2, batch_size=1,
                calls_per_task=1, actors=2, engine_resources={"engine_slot": 1})))
        except BaseException as exc:  # reported in the JSON line
            box["error"] = repr(exc)

    list_actors(address=cluster.address)  # the state API's first answer is slow: not while the job runs
    thread = threading.Thread(target=job)
    started = time.monotonic()
    thread.start()
    images = Path(output) / "images"
    removed_at = None
    while thread.is_alive() and time.monotonic() - started < 300:
        on_worker = [a for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")])
                     if "EditActor" in a.class_name and a.node_id == worker.node_id]
        done = len(list(images.rglob("*.png"))) if images.exists() else 0
        if on_worker and done >= 1:
            cluster.remove_node(worker)
            removed_at = done
            break
        time.sleep(0.2)
    thread.join(timeout=400)
    print(json.dumps({"removed_after_images": removed_at, "summary": box.get("summary"), "error": box.get("error"),
                      "seconds": time.monotonic() - started}, default=str))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
