"""`ray job submit` to the session's Ray (token authentication on, as Ray 2.60 starts by default) runs the job.

The session's Ray serves the job API from its dashboard, as a `ray start --head` node does; submitting there instead
of to a head of its own saves the test a Ray start and stop (about 20 s), and the job still goes the whole way a
submitted job goes: the working directory uploaded, the entrypoint's `python` started by Ray's job supervisor, the
driver joining the cluster it was submitted to.

Where another Ray on the machine held the dashboard agent's fixed port (52365) when the session's Ray started, that
Ray's job server has no agent and answers "No available agent" for ever; the test then submits to a head of its own,
every port of which is a free one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.jobkit import picture, png_path, results, write_manifest

REPO = Path(__file__).resolve().parents[1]
NO_AGENT = "No available agent"


def _ray_bin() -> Path:
    ray_bin = Path(sys.executable).with_name("ray")
    return ray_bin if ray_bin.exists() else Path(shutil.which("ray") or "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _own_head(env: dict[str, str]) -> Iterator[str]:
    """A `ray start --head` on free ports (the session's Ray holds the defaults); yields its dashboard's address."""
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                              "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                              "metrics-export-port", "ray-client-server-port")}
    head = subprocess.Popen(
        [str(_ray_bin()), "start", "--head", "--block", *(f"--{name}={port}" for name, port in ports.items()),
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--num-gpus=0",
         "--object-store-memory=300000000", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)
    try:
        yield f"http://127.0.0.1:{ports['dashboard-port']}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _submit(address: str, env: dict[str, str], job_args: list[str], retry_s: float) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir REPO -- python jobs/edit.py ...`, again while the job server is not ready."""
    command = [str(_ray_bin()), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/edit.py", *job_args]
    deadline = time.monotonic() + retry_s
    while True:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        output = proc.stdout + proc.stderr
        not_ready = ("Connection refused", "Failed to connect", NO_AGENT, "try again later")
        if proc.returncode == 0 or time.monotonic() > deadline or not any(m in output for m in not_ready):
            return proc
        time.sleep(3)


def test_ray_job_submit_runs_the_job(tiny_model_path, tmp_path, ray_session):
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
    job_args = [manifest, "--output", str(tmp_path / "out"), "--model", str(tiny_model_path), "--size", "64",
                "--steps", "6", "--start-step", "2"]
    proc = _submit(address, env, job_args, retry_s=20)  # an agent that could not bind never comes
    if proc.returncode != 0 and NO_AGENT in proc.stdout + proc.stderr:
        with _own_head(env) as own:
            proc = _submit(own, env, job_args, retry_s=120)
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log
    assert "succeeded" in log.lower(), log
    assert "1 ok, 0 failed" in log, log
    table = results(str(tmp_path / "out"))
    assert table["submitted"]["status"] == "ok"
    assert png_path(tmp_path / "out", "submitted").exists()
