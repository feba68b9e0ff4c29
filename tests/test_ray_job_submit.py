"""`ray job submit` against a local `ray start --head` cluster, with token authentication on, runs the job."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.jobkit import picture, png_path, results, write_manifest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_job(tiny_model_path, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    (tmp_path / "img.png").write_bytes(picture(5))
    manifest = write_manifest([{"id": "submitted", "image_url": "img.png", "source_prompt": "a cat",
                                "edit_prompt": "a dog"}], str(tmp_path / "manifest.parquet"))
    # The cluster runs the entrypoint's `python` from its own PATH: the environment ddim-edit is installed in.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Every port this head listens on is a free one: the session's own Ray instance (conftest) already holds the
    # defaults (the dashboard agent's 52365 among them), and an agent that cannot bind never registers, which leaves
    # the job server answering "No available agent" for ever.
    ports = {name: _free_port() for name in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                              "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                              "metrics-export-port", "ray-client-server-port")}
    dashboard_port = ports["dashboard-port"]
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", *(f"--{name}={port}" for name, port in ports.items()),
         "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1", "--num-cpus=3", "--num-gpus=0",
         "--object-store-memory=300000000", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        command = [str(ray_bin), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
                   "python", "jobs/edit.py", manifest, "--output", str(tmp_path / "out"), "--model",
                   str(tiny_model_path), "--size", "64", "--steps", "6", "--start-step", "2"]
        deadline = time.monotonic() + 120
        while True:  # the job server answers some seconds after `ray start` returns
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
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()

