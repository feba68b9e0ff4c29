"""Chaos: a few hundred rows through the real CLI while its workers die where a cluster's faults land (results-writing
workers killed after their write, engine actors killed before they hand a batch on), the driver is SIGKILLed, and
the job is run again. The ledger must end with one row per manifest row, counted as the CLI says, every PNG saying
how it was made, and no PNG written twice."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from ddim_worker.core.images import read_png_text
from tests.jobkit import picture, write_manifest

REPO = Path(__file__).resolve().parents[1]

IMAGES, EDITS, BAD = 45, 4, 16
COUNTS = re.compile(r"ddim-edit: (\d+) rows: (\d+) ok, (\d+) failed, (\d+) skipped")


def _manifest(tmp_path: Path) -> str:
    rows = []
    for i in range(IMAGES):
        (tmp_path / f"p{i}.png").write_bytes(picture(500 + i))
        rows += [{"id": f"c{i}-{k}", "image_url": f"p{i}.png", "source_prompt": "a picture",
                  "edit_prompt": f"a picture, edit {k}", "seed": k} for k in range(EDITS)]
    rows += [{"id": f"bad{i}", "image_url": f"missing{i}.png", "source_prompt": "a picture",
              "edit_prompt": "an edit", "seed": 0} for i in range(BAD)]
    return write_manifest(rows, str(tmp_path / "chaos.parquet"))


def _command(manifest: str, out: Path, model: Path) -> list[str]:
    return [sys.executable, str(REPO / "jobs" / "edit.py"), manifest, "--output", str(out), "--model", str(model),
            "--size", "64", "--num-steps", "6", "--start-step", "2", "--batch-size", "4", "--calls-per-task", "2",
            "--results-shard-rows", "16", "--no-report"]


#: The session's Ray, which the drivers join (set by the test); the failpoints reach its workers through the job's
#: runtime environment (``cluster.init_ray``).
RAY: dict[str, str] = {}


def _env(failpoints: str, folder: Path) -> dict[str, str]:
    return {**os.environ, "DDIM_EDIT_FAILPOINTS": failpoints, "DDIM_EDIT_FAILPOINTS_DIR": str(folder), **RAY}


def _kills(folder: Path, point: str) -> int:
    return len(list((folder / "ddim-edit-failpoints").glob(f"{point}-*")))


def _pngs(out: Path) -> dict[str, tuple[int, int]]:
    return {p.stem: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "images").rglob("*.png")}


def test_chaos_kills_and_a_rerun_leave_one_row_per_id(tiny_model_path, tmp_path, ray_address, monkeypatch):
    monkeypatch.setitem(RAY, "RAY_ADDRESS", ray_address)
    manifest = _manifest(tmp_path)
    out = tmp_path / "out"
    total = IMAGES * EDITS + BAD

    # 1. a run whose write workers and engine actors die, SIGKILLed itself once a quarter of the PNGs exist
    first_faults = tmp_path / "faults-1"
    driver = subprocess.Popen(_command(manifest, out, tiny_model_path),
                              env=_env("results_written=2,engine_batch_done=1", first_faults),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                              start_new_session=True)
    started = time.monotonic()
    while driver.poll() is None and time.monotonic() - started < 300:
        if (out / "images").exists() and len(_pngs(out)) >= IMAGES * EDITS // 4:
            break
        time.sleep(0.1)
    assert driver.poll() is None, "the first run finished before it could be killed"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver (its job's workers are Ray's to clean up)
    driver.wait()
    time.sleep(2)
    before = _pngs(out)
    assert IMAGES * EDITS // 4 <= len(before) < IMAGES * EDITS

    # 2. the same command again, its results-writing workers killed three times after their write, and its engine
    #    actor killed before it hands a batch on
    faults = tmp_path / "faults-2"
    rerun = subprocess.run(_command(manifest, out, tiny_model_path),
                           env=_env("results_written=3,engine_batch_done=1", faults), capture_output=True,
                           text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert _kills(faults, "results_written") == 3 and _kills(faults, "engine_batch_done") == 1

    # One row per manifest row, read as any Parquet reader reads the folder (no library code in between).
    table = pq.read_table(out / "results").to_pylist()
    ids = [r["id"] for r in table]
    assert len(ids) == total and len(set(ids)) == total, (len(ids), len(set(ids)))
    statuses = {s: sum(r["status"] == s for r in table) for s in ("ok", "filtered", "failed", "skipped")}
    assert statuses == {"ok": IMAGES * EDITS, "filtered": 0, "failed": BAD, "skipped": 0}
    # The CLI's counts are the table's, and so are job.json's.
    printed = COUNTS.search(rerun.stdout)
    assert printed, rerun.stdout
    assert [int(g) for g in printed.groups()] == [total, statuses["ok"], statuses["failed"], statuses["skipped"]]
    job = json.loads((out / "job.json").read_text())
    assert job["state"] == "finished" and job["counts"] == statuses and job["missing"] == 0

    # Every PNG says how it was made, and it is its row's.
    for row in table:
        if row["status"] != "ok":
            continue
        data = Path(row["output_uri"]).read_bytes()
        text = read_png_text(data)
        assert text["ddim_edit:id"] == row["id"] and text["ddim_edit:edit_prompt"] == row["edit_prompt"]
        assert text["ddim_edit:input"] == row["input_digest"]
        assert f"seed={row['seed']}" in text["ddim_edit:settings"].split()
        Image.open(Path(row["output_uri"])).load()

    # No PNG written twice: what the killed run wrote is still the same file (recorded, not recomputed).
    after = _pngs(out)
    assert all(after[stem] == stamp for stem, stamp in before.items())
    assert job["recovered"] + job["done_before"] >= len(before) - 0  # every earlier PNG was recorded, not redone
    assert job["computed"] == total - job["done_before"] - job["recovered"]
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert not (out / "lease.json").exists()
    print(f"chaos: {len(before)} PNGs before the driver kill; rerun recovered {job['recovered']}, computed "
          f"{job['computed']}, {job['attempts']} attempt(s); kills: writes {_kills(first_faults, 'results_written')} + 3, "
          f"engine actors {_kills(first_faults, 'engine_batch_done')} + 1")
