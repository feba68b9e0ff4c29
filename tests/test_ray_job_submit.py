"""`ray job submit` to the session's Ray (token authentication on, as Ray 2.60 starts by default) runs the job.

The session's Ray serves the job API from its dashboard, as a `ray start --head` node does; submitting there instead
of to a head of its own saves the test a Ray start and stop (about 20 s), and the job still goes the whole way a
submitted job goes: the working directory uploaded, the entrypoint's `python` started by Ray's job supervisor, the
driver joining the cluster it was submitted to."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.jobkit import picture, png_path, results, write_manifest

REPO = Path(__file__).resolve().parents[1]


def test_ray_job_submit_runs_the_job(tiny_model_path, tmp_path, ray_session):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    (tmp_path / "img.png").write_bytes(picture(5))
    manifest = write_manifest([{"id": "submitted", "image_url": "img.png", "source_prompt": "a cat",
                                "edit_prompt": "a dog"}], str(tmp_path / "manifest.parquet"))
    # The cluster runs the entrypoint's `python` from its own PATH: the environment ddim-edit is installed in
    # (tests.support.env puts it first before the session's Ray starts).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"http://{ray_session.dashboard_url}"
    with pytest.raises(urllib.error.HTTPError) as refused:  # without the token the job server answers nothing
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=30)
    assert refused.value.code == 401
    command = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/edit.py", manifest, "--output", str(tmp_path / "out"), "--model",
               str(tiny_model_path), "--size", "64", "--steps", "6", "--start-step", "2"]
    deadline = time.monotonic() + 120
    while True:  # the job server can answer "not ready" for some seconds after Ray starts
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                              stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        not_ready = ("Connection refused", "Failed to connect", "No available agent", "try again later")
        if proc.returncode == 0 or time.monotonic() > deadline or not any(m in output for m in not_ready):
            break
        time.sleep(3)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "succeeded" in log.lower(), log
    assert "1 ok, 0 failed" in log, log
    table = results(str(tmp_path / "out"))
    assert table["submitted"]["status"] == "ok"
    assert png_path(tmp_path / "out", "submitted").exists()
