"""Jobs on a multi-node Ray cluster of their own (``ray.cluster_utils``), apart from the test session's Ray.

One cluster, started once by ``tests/scripts/node_faults.py`` in a subprocess, runs every scenario in turn (each adds
the nodes it needs and removes them after); the module-scoped ``cluster_runs`` fixture prepares their inputs, runs the
script and hands each test its scenario's report, its output folder and its part of the log. The tests only read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ddim_worker import storage
from ddim_worker.core.images import read_png_text
from tests.jobkit import picture, png_path, results, run_script, write_manifest


def _manifest(folder: Path, n: int, start: int = 200) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (folder / f"f{i}.png").write_bytes(picture(start + i))
        rows.append({"id": f"f{i}", "image_url": f"f{i}.png", "source_prompt": "a cat",
                     "edit_prompt": f"a dog {i}", "seed": i})
    return write_manifest(rows, str(folder / "m.parquet"))


def _gpu_manifest(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(4):
        (folder / f"a{i}.png").write_bytes(picture(3 + i))
        rows.append({"id": f"a{i}", "image_url": f"a{i}.png", "source_prompt": "a", "edit_prompt": "b"})
    return write_manifest(rows, str(folder / "m.parquet"))


@pytest.fixture(scope="module")
def cluster_runs(s3_server, tiny_model_path, tmp_path_factory) -> dict:
    """{scenario: (report, output folder, log)} from one run of ``node_faults.py``."""
    root = tmp_path_factory.mktemp("clusters")
    opts = s3_server.storage_options
    bucket = s3_server.make_bucket("bad-node")
    for path in tiny_model_path.rglob("*"):  # the bad-node scenario's model lives in an object store
        if path.is_file():
            storage.write_bytes(f"{bucket}/model/{path.relative_to(tiny_model_path)}", path.read_bytes(), opts)
    spec = {
        "bad_node": {"manifest": _manifest(root / "bad_node", 10), "output": str(root / "bad_node" / "out"),
                     "model": f"{bucket}/model", "storage_options": opts, "cache": str(root / "bad_node" / "cache")},
        "node_loss": {"manifest": _manifest(root / "node_loss", 8), "output": str(root / "node_loss" / "out"),
                      "model": str(tiny_model_path)},
        "gpus": {"manifest": _gpu_manifest(root / "gpus"), "output": str(root / "gpus" / "out"),
                 "model": str(tiny_model_path)},
    }
    reports, log = run_script("node_faults.py", json.dumps(spec), timeout=1200)
    parts = dict(re.findall(r"^=== scenario (\w+) ===\n(.*?)(?=^=== scenario )", log, re.S | re.M))
    assert set(parts) >= set(spec), log[-3000:]
    return {name: (reports.get(name, {"error": f"no report\n{log[-3000:]}"}), Path(spec[name]["output"]),
                   parts[name]) for name in spec}


def test_lost_worker_node_is_survived_by_rerunning_unfinished_rows(cluster_runs):
    report, out, log = cluster_runs["node_loss"]
    assert report["error"] is None, report["error"] + log[-3000:]
    assert report["removed_after_images"] is not None, "the worker node was not removed mid-job"
    table = results(str(out))
    assert sorted(table) == [f"f{i}" for i in range(8)] and all(r["status"] == "ok" for r in table.values())
    assert report["summary"]["counts"] == {"ok": 8, "filtered": 0, "failed": 0, "skipped": 0}
    if report["summary"]["attempts"] > 1:  # Ray aborted the dataset: the driver said so and re-ran the rest
        assert "re-running the" in log
    print(f"node loss: removed after {report['removed_after_images']} images; finished in "
          f"{report['seconds']:.1f}s after {report['summary']['attempts']} dataset attempt(s)")


def test_a_node_that_cannot_load_the_model_does_not_end_the_job(cluster_runs):
    """Two engine nodes, one of which cannot hold the model's copy: its actors die at start-up again and again while
    the other node's actor edits every row."""
    report, _, log = cluster_runs["bad_node"]
    assert report["error"] is None, report["error"] + log[-3000:]
    summary = report["summary"]
    assert summary["counts"] == {"ok": 10, "filtered": 0, "failed": 0, "skipped": 0} and summary["state"] == "finished"
    assert "cannot load model" in log  # the bad node's actors did try, and failed
    print(f"bad node: 10 rows ok in {report['seconds']:.1f}s, {summary['attempts']} attempt(s)")


def test_gpus_actors_and_dtype_decided_where_the_gpus_are(cluster_runs):
    """A CPU head and a worker with GPUs: without --actors the pool takes every GPU, the engine actors get them by
    default, and the dtype they ran (fp32: the GPUs here are only Ray resources) is what the results, the PNG and
    job.json say. The figures are runtime facts: job.json's config holds none, so a rerun from it on a one-GPU
    cluster uses one actor."""
    report, out, log = cluster_runs["gpus"]
    assert report["error"] is None, report["error"] + log[-3000:]
    two, one = report["two_gpus"], report["one_gpu"]
    assert (two["actors"], two["max_actors"], two["gpus_per_actor"]) == (2, None, 1.0)
    assert two["config"]["actors"] is None and two["config"]["gpus_per_actor"] is None
    assert (one["actors"], one["gpus_per_actor"], one["computed"]) == (1, 1.0, 4)
    record = json.loads((out / "job.json").read_text())
    assert record["actors"] == 1 and record["config"]["actors"] is None and record["dtype"] == "float32"
    row = results(str(out))["a0"]
    assert row["status"] == "ok" and row["dtype"] == "float32"
    assert "dtype=float32" in read_png_text(png_path(out, "a0").read_bytes())["ddim_edit:settings"]
