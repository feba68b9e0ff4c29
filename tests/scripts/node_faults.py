"""Jobs on one multi-node Ray cluster (ray.cluster_utils), started once, whose nodes change between jobs.

Run as a subprocess by tests/test_clusters.py (its own Ray cluster, apart from the test session's): one cluster start,
one driver import and one ``ray.init`` for three scenarios that each once had a cluster (and a process) of their own.
The head (3 CPUs, one ``engine_slot``, dashboard on for the state API, no GPU) stays; each scenario adds the nodes it
needs and removes them when it is done, so the next one sees only its own nodes:

1. ``bad_node``: two engine nodes (resource ``engine``), one of which cannot create its model cache (as on a node with
   a broken disk): its actors fail to start again and again while the good node's actor edits every row. The model
   lives in an object store, so every engine node copies it to its model cache first.
2. ``node_loss``: two engine nodes (resource ``engine_slot``: the head, and a worker that is removed mid-job once it
   holds an engine actor and a PNG exists). Ray Data alone aborts the dataset when the node dies; the
   driver re-runs the unfinished rows through the resume path.
3. ``gpus``: a worker that says it has GPUs (only Ray resources: torch there sees no CUDA, so the actors run on its CPU
   in fp32, and the job must say so). First 2 GPUs and no --actors: the pool takes both (job.json: "actors": 2, its
   config without the figure); then that node is replaced by one with 1 GPU and the job is rerun from the first run's
   job.json (--config OUT/job.json --overwrite): one actor.

Each scenario's log on stderr starts with a line ``=== scenario NAME ===``. Prints one JSON line: a report per scenario.

    node_faults.py SPEC_JSON    (SPEC: {"bad_node": {...}, "node_loss": {...}, "gpus": {...}}; see main)
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

from ddim_worker.job.args import parse_args
from ddim_worker.job.config import JobConfig
from ddim_worker.job.driver import run_job

STORE = 150 * 2**20


def _begin(name: str) -> None:
    time.sleep(1.0)  # the previous scenario's worker lines (forwarded by Ray's log monitor) land before the marker
    print(f"=== scenario {name} ===", file=sys.stderr, flush=True)


def _wait_for(resources: dict[str, float], timeout: float = 60.0) -> None:
    """Until the cluster's totals of ``resources`` are exactly these (removed nodes gone, added nodes in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        have = ray.cluster_resources()
        if all(have.get(name, 0) == amount for name, amount in resources.items()):
            return
        time.sleep(0.2)
    raise TimeoutError(f"the cluster did not reach {resources}: {ray.cluster_resources()}")


def bad_node(cluster: Cluster, spec: dict) -> dict:
    nodes = [cluster.add_node(num_cpus=1, resources={"engine": 1}, object_store_memory=STORE,
                              env_vars={"DDIM_EDIT_MODEL_CACHE": cache})
             for cache in (spec["cache"], "/dev/null/no-cache-here")]
    _wait_for({"engine": 2})
    report: dict = {"error": None}
    started = time.monotonic()
    try:
        config = JobConfig.from_flat(dict(manifest=spec["manifest"], output=spec["output"], model=spec["model"],
                                          size=64, num_steps=4, start_step=1, batch_size=2, calls_per_task=1,
                                          actors=2, engine_resources={"engine": 1}, report=False,
                                          storage_options=spec["storage_options"]))
        report["summary"] = run_job(config)
    except BaseException as exc:  # reported in the JSON line
        report["error"] = repr(exc)
    finally:
        report["seconds"] = time.monotonic() - started
        for node in nodes:
            cluster.remove_node(node)
    return report


def node_loss(cluster: Cluster, spec: dict) -> dict:
    # One "engine_slot" on the head and one on the worker, and two actors: one engine actor lands on each node. The
    # head keeps enough CPUs for the fetch/write tasks and the surviving actor once the worker is gone.
    worker = cluster.add_node(num_cpus=2, resources={"engine_slot": 1}, object_store_memory=STORE)
    _wait_for({"engine_slot": 2, "engine": 0})
    box: dict = {}
    output = spec["output"]

    def job() -> None:
        try:
            box["summary"] = run_job(JobConfig.from_flat(dict(
                manifest=spec["manifest"], output=output, model=spec["model"], size=64, num_steps=24, start_step=2,
                batch_size=1, calls_per_task=1, actors=2, engine_resources={"engine_slot": 1})))
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
    report = {"removed_after_images": removed_at, "summary": box.get("summary"), "error": box.get("error"),
              "seconds": time.monotonic() - started}
    if removed_at is None:
        cluster.remove_node(worker)
    return report


def gpus(cluster: Cluster, spec: dict) -> dict:
    report: dict = {"error": None}
    try:
        # gpus_per_actor and actors left to their defaults: decided from the cluster's resources.
        first = JobConfig.from_flat(dict(manifest=spec["manifest"], output=spec["output"], model=spec["model"],
                                         size=64, num_steps=4, start_step=1, batch_size=2, calls_per_task=1,
                                         report=False))
        node = cluster.add_node(num_cpus=2, num_gpus=2, object_store_memory=STORE)
        _wait_for({"GPU": 2, "engine_slot": 1})
        try:
            report["two_gpus"] = run_job(first)
        finally:
            cluster.remove_node(node)
        again = parse_args(["--config", str(Path(spec["output"]) / "job.json"), "--overwrite"])
        node = cluster.add_node(num_cpus=2, num_gpus=1, object_store_memory=STORE)
        _wait_for({"GPU": 1})
        try:
            report["one_gpu"] = run_job(again)
        finally:
            cluster.remove_node(node)
    except BaseException as exc:  # reported in the JSON line
        report["error"] = repr(exc)
    return report


SCENARIOS = {"bad_node": bad_node, "node_loss": node_loss, "gpus": gpus}


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    with socket.socket() as probe:  # the default dashboard port may be taken by another Ray on this machine
        probe.bind(("127.0.0.1", 0))
        dashboard_port = probe.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "num_gpus": 0, "resources": {"engine_slot": 1}, "include_dashboard": True,
        "dashboard_port": dashboard_port, "object_store_memory": 200 * 2**20})
    ray.init(address=cluster.address)
    reports: dict = {}
    try:
        for name, scenario in SCENARIOS.items():
            if name in spec:
                _begin(name)
                try:
                    reports[name] = scenario(cluster, spec[name])
                except BaseException as exc:  # a scenario's set-up failed: said in its report, the others go on
                    reports[name] = {"error": repr(exc)}
    finally:
        _begin("end")
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(reports, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
