"""Chaos on a real object store (SeaweedFS on loopback): drivers killed during the finish step, during compaction
and during packing, an S3 outage that outlasts the lease while a second driver starts, a lease holder whose clock is
an hour off. After each: a rerun gives one row per manifest row, the dataset holds every ok row once, and no object
under the output is a Parquet file without its footer."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ddim_worker import storage
from ddim_worker.job import ledger
from ddim_worker.job.driver import JobError
from ddim_worker.job.lease import LeaseHeld, LeaseRecord, check_free
from ddim_worker.job.pack import current_data_files
from ddim_worker.job.shards import list_shards
from ddim_worker.outputs import OutputLayout
from tests.jobkit import picture, run, write_manifest
from tests.support.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[1]
IMAGES, EDITS, LATE = 5, 2, 2  # LATE images are missing in the first run and appear before the second
LEASE_S = "15"  # renewed every 2.5 s, fenced after 7.5 s: room for a loaded 2-core machine


def _manifest(tmp_path: Path) -> tuple[str, list[Path]]:
    rows, late = [], []
    for i in range(IMAGES + LATE):
        path = tmp_path / f"s{i}.png"
        if i < IMAGES:
            path.write_bytes(picture(800 + i, size=64))
        else:
            late.append(path)
        rows += [{"id": f"s{i}-{k}", "image_url": path.name, "source_prompt": "a picture",
                  "edit_prompt": f"a picture, edit {k}"} for k in range(EDITS)]
    rows.append({"id": "gone", "image_url": "never-there.png", "source_prompt": "a", "edit_prompt": "b"})
    return write_manifest(rows, str(tmp_path / "m.parquet")), late


def _command(manifest: str, out: str, options: dict, model: Path, steps: int = 6) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "edit.py"), manifest, "--output", out, "--storage-options",
            json.dumps(options), "--model", str(model), "--size", "64", "--num-steps", str(steps), "--start-step", "2",
            "--batch-size", "2", "--calls-per-task", "1", "--results-shard-rows", "2", "--no-report"]


#: The session's Ray, which the drivers join (set by the test): every failpoint here fires in the driver, and the
#: lease is the driver's, so the drivers need no Ray of their own (a second each instead of ten or more).
RAY: dict[str, str] = {}


def _env(folder: Path, failpoints: str = "") -> dict[str, str]:
    return {**os.environ, "DDIM_EDIT_FAILPOINTS": failpoints, "DDIM_EDIT_FAILPOINTS_DIR": str(folder),
            "DDIM_EDIT_LEASE_EXPIRES_S": LEASE_S, **RAY}


def _killed_at(point: str, command: list[str], folder: Path) -> None:
    done = subprocess.run(command, env=_env(folder, f"{point}=1"), capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == -signal.SIGKILL, f"{point}: rc {done.returncode}\n{done.stderr[-3000:]}"


def _footers_whole(out: str, options: dict) -> int:
    """Every .parquet object under the output ends in its footer and opens; returns how many there are."""
    fs, root = storage.filesystem(out, options)
    fs.invalidate_cache()
    files = [p for p in fs.find(root) if p.endswith(".parquet")]
    for path in files:
        with fs.open(path, "rb") as handle:
            handle.seek(-4, os.SEEK_END)
            assert handle.read(4) == b"PAR1", f"{path} has no footer"
            pq.read_metadata(handle)
    return len(files)


def _dataset_ids(out: str, options: dict) -> list[str]:
    fs, _ = storage.filesystem(out, options)
    ids: list[str] = []
    for uri in current_data_files(OutputLayout(out), options):
        with fs.open(storage.filesystem(uri, options)[1], "rb") as handle:
            ids += pq.read_table(handle, columns=["id"]).column("id").to_pylist()
    return ids


def _check(out: str, options: dict, ok: set[str], total: int) -> None:
    """One row per manifest row in the ledger, the dataset holds every ok row once, no footerless file."""
    table = ledger.read_table(OutputLayout(out), options, images=False).to_pylist()
    assert len(table) == total and len({r["id"] for r in table}) == total
    assert {r["id"] for r in table if r["status"] == "ok"} == ok
    ids = _dataset_ids(out, options)
    assert sorted(ids) == sorted(ok), (len(ids), len(ok))
    _footers_whole(out, options)


@pytest.mark.usefixtures("ray_session")
def test_chaos_on_s3_kills_an_outage_and_a_skewed_clock(tiny_model_path, tmp_path, s3_server, ray_address,
                                                        monkeypatch):
    monkeypatch.setitem(RAY, "RAY_ADDRESS", ray_address)
    manifest, late = _manifest(tmp_path)
    options = s3_server.storage_options
    out = f"{s3_server.make_bucket('chaos-' + uuid.uuid4().hex[:8])}/out"
    total = (IMAGES + LATE) * EDITS + 1
    early = {f"s{i}-{k}" for i in range(IMAGES) for k in range(EDITS)}
    everyone = early | {f"s{i}-{k}" for i in range(IMAGES, IMAGES + LATE) for k in range(EDITS)}

    # 1. killed in the finish step (results compacted, dataset packed, job.json not yet written)
    _killed_at("finish_before_record", _command(manifest, out, options, tiny_model_path), tmp_path / "f1")
    _check(out, options, early, total)
    for path in late:
        path.write_bytes(picture(900 + late.index(path), size=64))

    # 2. killed during compaction: the rows that failed in run 1 are ok now; their old rows are being compacted away
    _killed_at("compaction_written", _command(manifest, out, options, tiny_model_path), tmp_path / "f2")
    assert _footers_whole(out, options) > 0

    # 3. killed during packing, the new files written and the card not yet switched: the dataset is run 1's, whole
    _killed_at("pack_before_switch", _command(manifest, out, options, tiny_model_path), tmp_path / "f3")
    assert sorted(_dataset_ids(out, options)) == sorted(early)
    _footers_whole(out, options)

    # 4. an S3 outage: the driver reaches the store through a proxy that is cut while it works (other settings: every
    #    row is redone). It must stop writing before its lease could expire; a second driver is refused while the
    #    lease is live and runs once it is not.
    proxy = TcpProxy(int(s3_server.endpoint_url.rsplit(":", 1)[1]))
    cut_off = {**options, "client_kwargs": {**options["client_kwargs"], "endpoint_url": proxy.endpoint_url},
               "config_kwargs": {"connect_timeout": 2, "read_timeout": 5, "retries": {"max_attempts": 2}}}
    layout = OutputLayout(out)
    first = subprocess.Popen(_command(manifest, out, cut_off, tiny_model_path, steps=16), env=_env(tmp_path / "f4"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        before = {s.name for s in list_shards(layout, options)}
        while first.poll() is None and time.monotonic() < deadline:
            if {s.name for s in list_shards(layout, options)} - before:
                break  # it has recorded some rows of this run
            time.sleep(0.2)
        assert first.poll() is None, "the first driver finished before the outage"
        proxy.cut()
        cut_at, cut_wall = time.monotonic(), time.time()
        with pytest.raises(LeaseHeld, match="held by run"):  # another driver, on the store directly: refused
            check_free(layout.lease, options)
        assert first.poll() is None
        _, err = first.communicate(timeout=120)
        assert first.returncode == 2 and "stopped writing" in err, err[-3000:]
        exited_after = time.monotonic() - cut_at
        # when it knew, by its own log: before the lease could expire, so before anyone else could take the output
        knew = re.search(r"^(\S+ \S+) ERROR ddim_edit.job: this run lost the output", err, re.M)
        assert knew, err[-3000:]
        stopped_after = datetime.strptime(knew.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - cut_wall
        assert stopped_after < float(LEASE_S), stopped_after
        written_by_first = {s.name for s in list_shards(layout, options)}
        proxy.restore()
        second = _command(manifest, out, options, tiny_model_path, steps=16)
        done = subprocess.run(second, env=_env(tmp_path / "f6"), capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr[-3000:]
        record = json.loads(storage.read_bytes(layout.job_record, options))
        first_run = record["run"] - 1
        late_shards = [n for n in {s.name for s in list_shards(layout, options)} - written_by_first
                       if f"-r{first_run:06d}-" in n]
        assert not late_shards, f"the first driver wrote after it stopped: {late_shards}"
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        proxy.close()
    _check(out, options, everyone, total)
    assert not storage.exists(layout.lease, options)

    # 5. a live lease whose holder's clock is an hour behind (its record says it renewed an hour ago): refused
    skewed = LeaseRecord("skewed-host-run", "another-host", 1, time.time() - 7200, time.time() - 3600)
    storage.write_bytes(layout.lease, skewed.to_bytes(), options)
    with pytest.raises(JobError, match="held by run skewed-host-run"):
        run(manifest, out, tiny_model_path, storage_options=options)
    storage.remove(layout.lease, options)

    # 6. the same command once more: nothing to do, everything as it should be
    final = subprocess.run(_command(manifest, out, options, tiny_model_path, steps=16), env=_env(tmp_path / "f7"),
                           capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert final.returncode == 0, final.stderr[-3000:]
    record = json.loads(storage.read_bytes(layout.job_record, options))
    assert record["computed"] == 1 and record["state"] == "finished"  # only the row whose image never exists
    _check(out, options, everyone, total)
    print(f"chaos on S3: the cut-off driver stopped writing {stopped_after:.1f} s after the outage began and exited "
          f"after {exited_after:.1f} s (lease {LEASE_S} s); {_footers_whole(out, options)} Parquet objects, all with "
          "footers")
